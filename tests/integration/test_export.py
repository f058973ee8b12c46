"""export.py round trips: safetensors + JSON, torch.export, ONNX through onnxruntime, each
equal to the PyTorch generator in eval mode on shapes other than the traced one, multiples
of the size multiple or not (600 x 600); p2p-export itself, as a user runs it, silent on
stderr; and docs/export.md's onnxruntime example, run as the page shows it."""
import importlib.util
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from data_tools.make_demo import make_pair
from pipeline.checkpoint import load_generator
from pipeline.export import ONNX_TOLERANCE
from pipeline.translate import main as translate
from pipeline.translate_geometry import run_whole
from tests.conftest import require_component
from tests.helpers.trainer_runs import ROOT, cpu_env, explain

# all on trained_run: the real trainer, 100 steps (15-90 s on 2 cores, by load)
pytestmark = pytest.mark.slow

# batch, H and W other than the traced ones; 600 x 600 is no multiple of the U-Net's 128
SHAPES = [(1, 3, 128, 128), (3, 3, 256, 384), (1, 3, 600, 600)]
# as on the base install, where torch's ONNX exporter finds no torchvision and says so
WITHOUT_TORCHVISION = "import sys\nsys.modules['torchvision'] = None\n"


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    """p2p-export with its defaults, in a fresh process without torchvision."""
    root = tmp_path_factory.mktemp("export")
    (root / "site").mkdir()
    (root / "site" / "sitecustomize.py").write_text(WITHOUT_TORCHVISION)
    require_component(shutil.which("p2p-export") is not None, "console script p2p-export (pip install -e .)")
    env = cpu_env(PYTHONPATH=os.pathsep.join([str(root / "site"), str(ROOT)]))
    result = subprocess.run(["p2p-export", "--checkpoint", trained_run["checkpoint"], "--out",
                             str(root / "out")], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, explain(result)
    generator, _ = load_generator(trained_run["checkpoint"])
    return root / "out", generator, result


def outputs(forward, shapes=SHAPES):
    torch.manual_seed(0)
    inputs = [torch.rand(shape) * 2 - 1 for shape in shapes]
    with torch.no_grad():
        return inputs, [forward(x) for x in inputs]


def padded(generator):
    """The PyTorch reference at any size: p2p-translate's padding to the multiple."""
    return lambda x: run_whole(generator, x, 2 ** generator.num_downs)


def test_a_default_export_says_how_to_call_it_and_writes_no_warning(exported):
    out, _, result = exported
    assert result.stderr == "", explain(result)  # no torchvision lines, no FutureWarning
    assert "onnxruntime vs PyTorch max |diff|" in result.stdout
    assert "input x: N x 3 (RGB) x H x W float32 in [-1, 1], any H and W (reflect-padded inside " \
           "to multiples of 128)" in result.stdout and "docs/export.md" in result.stdout


def test_safetensors_export_rebuilds_the_same_generator_without_the_trainer(exported):
    out, generator, _ = exported
    rebuilt, info = load_generator(str(out))
    on_disk = json.loads((out / "generator.json").read_text())
    assert on_disk["format"] == "pix2pix-at-scale/generator" and info.data.crop_size == 128
    for a, b in zip(outputs(padded(generator))[1], outputs(padded(rebuilt))[1]):
        assert torch.equal(a, b)


def test_torch_export_program_equals_pytorch(exported):
    out, generator, _ = exported
    program = torch.export.load(str(out / "generator.pt2")).module()
    for a, b in zip(outputs(padded(generator))[1], outputs(program)[1]):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_onnx_export_equals_pytorch_in_onnxruntime(exported):
    require_component(importlib.util.find_spec("onnxruntime") is not None,
                      "onnxruntime (pip install '.[export]')")
    import onnxruntime
    out, generator, _ = exported
    session = onnxruntime.InferenceSession(str(out / "generator.onnx"), providers=["CPUExecutionProvider"])
    inputs, expected = outputs(padded(generator))
    for x, y in zip(inputs, expected):
        (result,) = session.run(None, {"x": x.numpy()})
        error = (torch.from_numpy(result) - y).abs().max().item()
        print(f"onnxruntime vs PyTorch {tuple(x.shape)}: max |diff| {error:.2e}")
        assert error <= ONNX_TOLERANCE


def test_the_docs_onnxruntime_example_runs_as_written(exported, tmp_path, monkeypatch):
    """docs/export.md's example block, executed as it stands, on a 600 x 600 photo: it
    gives what p2p-translate gives in the exports' mode (up to PIL's resize against torch's)."""
    require_component(importlib.util.find_spec("onnxruntime") is not None,
                      "onnxruntime (pip install '.[export]')")
    page = (ROOT / "docs" / "export.md").read_text()
    code = re.search(r"<!-- example: onnxruntime -->\n```python\n(.*?)```", page, re.S).group(1)
    out, _, _ = exported
    (tmp_path / "export").symlink_to(out)
    Image.fromarray(make_pair(5, "photo", 0, 600)[:, :600]).save(tmp_path / "photo.png")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(ROOT / "docs" / "export.md"), "exec"), {})  # noqa: S102 - the doc's own code
    result = np.asarray(Image.open(tmp_path / "translated.png")).astype(int)
    assert translate(["--checkpoint", str(out), str(tmp_path / "photo.png"), "--out", str(tmp_path / "t"),
                      "--dropout", "off", "--norm-stats", "running", "--quiet",
                      "--split-pair", "no"]) == 0  # the whole photo, as the example takes it
    expected = np.asarray(Image.open(tmp_path / "t" / "photo.png")).astype(int)
    difference = np.abs(result - expected)
    print(f"doc example vs p2p-translate: mean |diff| {difference.mean():.2f}, max {difference.max()}")
    assert result.shape == expected.shape == (600, 600, 3) and difference.mean() < 2
