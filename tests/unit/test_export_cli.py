"""export.py's command line in-process: an unknown format and a folder that is no
checkpoint fail clearly; the exporter's noise is silenced exactly (the round trips of a
trained generator, p2p-export's stderr and docs/export.md's example:
tests/integration/test_export.py)."""
import logging
import warnings

import pytest

from pipeline.export import REGISTRY_LOGGER, exporter_quiet, main


def test_unknown_format_and_foreign_checkpoint_fail_clearly(tmp_path, capsys):
    with pytest.raises(SystemExit) as usage:  # argparse: a usage error
        main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "o"), "--format", "tflite"])
    assert usage.value.code == 2
    assert "unknown format 'tflite'" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no generator.json" in capsys.readouterr().err


def test_only_the_exporters_torchvision_lines_and_leafspec_warning_are_silenced(caplog):
    """What torch.onnx.export says on a base install (no torchvision) and on torch 2.13 goes;
    any other warning of the same logger or category still shows, and after the block
    those two show again."""
    registry = logging.getLogger(REGISTRY_LOGGER)

    def speak():
        registry.warning("torchvision is not installed. Skipping %s", "torchvision::nms")
        registry.warning("Failed to register something else")
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=2)
        warnings.warn("another FutureWarning", FutureWarning, stacklevel=2)

    with warnings.catch_warnings(record=True) as seen, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        with exporter_quiet():
            speak()
        assert [r.getMessage() for r in caplog.records] == ["Failed to register something else"]
        assert [str(w.message) for w in seen] == ["another FutureWarning"]
        speak()
    assert len(caplog.records) == 3 and len(seen) == 3
