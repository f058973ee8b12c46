"""export.py's command line in-process: an unknown format and a folder that is no
checkpoint fail clearly; the exporter's noise is silenced exactly; the run's scale it
states, and docs/export.md's eval size, are the geometry's (the round trips of a
trained generator, p2p-export's stderr and docs/export.md's example:
tests/integration/test_export.py)."""
import dataclasses
import logging
import re
import warnings
from pathlib import Path

import pytest

from pipeline.config import Config
from pipeline.data import Geometry
from pipeline.export import REGISTRY_LOGGER, exporter_quiet, interface, main, onnx_metadata
from pipeline.weights import GeneratorInfo, TrainedOn

ROOT = Path(__file__).resolve().parents[2]


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


# ----------------------------------------------------------------- the run's scale

def scale_width_info(**data) -> GeneratorInfo:
    model = dataclasses.replace(Config().model, generator="resnet_6blocks")
    return GeneratorInfo(1, model, TrainedOn(**{"load_size": 1024, "crop_size": 256, **data}))


def test_the_interface_line_gives_the_runs_eval_size_not_the_crop():
    """p2p-export's last line tells the caller the scale to resize inputs to: the geometry's
    eval size (a scale_width run: its width, the aspect kept), the crop for resize_and_crop
    and for an older generator.json recording no preprocess, nothing when none is recorded."""
    line = interface(scale_width_info(preprocess="scale_width"), 5)
    assert "the run's scale: inputs resized to width 1024, the aspect kept, each side rounded " \
           "to a multiple of 4 (data.preprocess scale_width)" in line
    assert "inputs resized to 256x256 (data.preprocess resize_and_crop)" in interface(scale_width_info(), 5)
    assert "256x128" in interface(scale_width_info(preprocess="resize_and_crop", crop_height=128), 5)
    assert "the run's scale" not in interface(scale_width_info(load_size=None, crop_size=None), 5)


@pytest.mark.parametrize("preprocess", [None, "resize_and_crop", "crop", "scale_width",
                                        "scale_width_and_crop", "scale_shortside_and_crop", "none"])
def test_the_docs_eval_size_is_the_geometrys(preprocess):
    """docs/export.md's eval_size (the onnxruntime example's, from the ONNX metadata
    strings) gives what Geometry.eval_size gives, for each mode and a few shapes."""
    page = (ROOT / "docs" / "export.md").read_text()
    source = re.search(r"^def eval_size\(.*?(?=^\S)", page, re.M | re.S).group(0)
    scope = {}
    exec(compile(source, "docs/export.md", "exec"), scope)  # noqa: S102 - the doc's own code
    info = scale_width_info(preprocess=preprocess, load_size=300, crop_height=96)
    metadata = onnx_metadata(info, 5)
    geometry = Geometry.of(info.data, info.model.size_multiple)
    for height, width in ((1024, 2048), (600, 450), (37, 129), (256, 256)):
        expected = geometry.eval_size((height, width))
        assert scope["eval_size"](metadata, width, height) == (expected[1], expected[0]), (height, width)
