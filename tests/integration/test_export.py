"""export.py round trips: safetensors + JSON, torch.export, ONNX through onnxruntime, each
equal to the PyTorch generator in eval mode on shapes other than the traced one."""
import importlib.util

import pytest
import torch

from pipeline.checkpoint import load_generator
from pipeline.export import ONNX_TOLERANCE, main
from tests.conftest import require_component

# all on trained_run: the real trainer, 100 steps (15-90 s on 2 cores, by load)
pytestmark = pytest.mark.slow

SHAPES = [(1, 3, 128, 128), (3, 3, 256, 384)]  # batch, H and W other than the traced ones


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    formats = "safetensors,torch-export" + (",onnx" if importlib.util.find_spec("onnxruntime") else "")
    assert main(["--checkpoint", trained_run["checkpoint"], "--out", str(out), "--format", formats]) == 0
    generator, _ = load_generator(trained_run["checkpoint"])
    return out, generator


def outputs(module, shapes=SHAPES):
    torch.manual_seed(0)
    inputs = [torch.rand(shape) * 2 - 1 for shape in shapes]
    with torch.no_grad():
        return inputs, [module(x) for x in inputs]


def test_safetensors_export_rebuilds_the_same_generator_without_the_trainer(exported):
    out, generator = exported
    rebuilt, meta = load_generator(str(out))
    assert meta["format"] == "pix2pix-at-scale/generator" and meta["data"]["crop_size"] == 128
    for a, b in zip(outputs(generator)[1], outputs(rebuilt)[1]):
        assert torch.equal(a, b)


def test_torch_export_program_equals_pytorch(exported):
    out, generator = exported
    program = torch.export.load(str(out / "generator.pt2")).module()
    for a, b in zip(outputs(generator)[1], outputs(program)[1]):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_onnx_export_equals_pytorch_in_onnxruntime(exported):
    require_component(importlib.util.find_spec("onnxruntime") is not None,
                      "onnxruntime (pip install '.[export]')")
    import onnxruntime
    out, generator = exported
    session = onnxruntime.InferenceSession(str(out / "generator.onnx"), providers=["CPUExecutionProvider"])
    inputs, expected = outputs(generator)
    for x, y in zip(inputs, expected):
        (result,) = session.run(None, {"x": x.numpy()})
        error = (torch.from_numpy(result) - y).abs().max().item()
        print(f"onnxruntime vs PyTorch {tuple(x.shape)}: max |diff| {error:.2e}")
        assert error <= ONNX_TOLERANCE
