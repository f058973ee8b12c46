"""export.py's command line in-process: an unknown format and a folder that is no
checkpoint fail clearly (the round trips of a trained generator:
tests/integration/test_export.py)."""
import pytest

from pipeline.export import main


def test_unknown_format_and_foreign_checkpoint_fail_clearly(tmp_path, capsys):
    with pytest.raises(SystemExit) as usage:  # argparse: a usage error
        main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "o"), "--format", "tflite"])
    assert usage.value.code == 2
    assert "unknown format 'tflite'" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no generator.json" in capsys.readouterr().err
