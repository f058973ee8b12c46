"""evaluate.py as a command: metrics JSON, a PNG grid and an HTML page, on 1 process and
split across 2 (accelerate, gloo), and the page rendered by headless Chromium."""
import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import pytest
from PIL import Image

from tests.conftest import require_component
from tests.helpers.trainer_runs import ROOT, accelerate, cpu_env, explain, gloo_env, run

# all on trained_run (the trainer, 100 steps) and a report made by evaluate.py: ~40 s before the first
pytestmark = pytest.mark.slow

EVALUATE = str(ROOT / "pipeline" / "evaluate.py")
DETERMINISTIC = ["--dropout", "off", "--norm-stats", "running"]
VOID = {"meta", "img", "br", "link", "input", "hr"}


def evaluate_args(trained_run, out, *extra):
    return ["--checkpoint", trained_run["checkpoint"], "--data", trained_run["shards"],
            "--out", str(out), "--num-workers", "0", *extra]


@pytest.fixture(scope="module")
def report(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    result = run([sys.executable, EVALUATE, *evaluate_args(trained_run, out, *DETERMINISTIC)], cpu_env())
    assert result.returncode == 0, explain(result)
    return out, result


class TagBalance(HTMLParser):
    """Every non-void element closed, in order; the image sources seen."""

    def __init__(self):
        super().__init__()
        self.open, self.images, self.errors = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        if tag not in VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        if not self.open or self.open.pop() != tag:
            self.errors.append(tag)


def test_report_holds_metrics_grid_and_a_well_formed_page(report):
    out, result = report
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 6 and metrics["world_size"] == 1
    assert metrics["test_mode"] == {"dropout": "off", "norm_stats": "running", "seed": 0}
    assert 0 < metrics["l1"] < 1 and metrics["psnr"] > 10 and 0 < metrics["ssim"] <= 1
    assert len(metrics["samples"]) == 6  # --samples 8, the split has 6
    assert Image.open(out / "samples.png").size == (3 * 128, 6 * 128)  # input | output | target
    page = (out / "index.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    parser = TagBalance()
    parser.feed(page)
    assert not parser.errors and not parser.open and parser.images == ["samples.png"]
    assert f"{metrics['l1']:.4f}" in page and "dropout off" in page
    assert "report in" in result.stdout


def test_two_processes_give_the_same_metrics(trained_run, report, tmp_path):
    out = tmp_path / "ddp"
    result = run(accelerate(evaluate_args(trained_run, out, *DETERMINISTIC), script=EVALUATE), gloo_env())
    assert result.returncode == 0, explain(result)
    one = json.loads((report[0] / "metrics.json").read_text())
    two = json.loads((out / "metrics.json").read_text())
    assert two["world_size"] == 2 and two["images"] == one["images"] == 6
    for key in ("l1", "psnr", "ssim"):
        assert two[key] == pytest.approx(one[key], rel=1e-6)


def test_the_page_renders_with_its_grid_in_headless_chromium(report, tmp_path):
    chromium = shutil.which("chromium")
    require_component(chromium is not None, "chromium (apt-get install chromium)")
    out, _ = report
    dom = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom",
         (out / "index.html").as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    # the grid's onload handler wrote its decoded width onto <body>: it loaded and rendered
    assert '<body data-grid-width="384">' in dom.stdout, dom.stdout[:2000]


def test_default_mode_is_the_papers_and_a_foreign_checkpoint_is_refused(trained_run, tmp_path):
    result = run([sys.executable, EVALUATE,
                  *evaluate_args(trained_run, tmp_path / "paper", "--samples", "2")], cpu_env())
    assert result.returncode == 0, explain(result)
    metrics = json.loads((tmp_path / "paper" / "metrics.json").read_text())
    assert metrics["test_mode"]["dropout"] == "on" and metrics["test_mode"]["norm_stats"] == "batch"
    refused = run([sys.executable, EVALUATE, "--checkpoint", str(tmp_path), "--data",
                   trained_run["shards"], "--out", str(tmp_path / "x")], cpu_env())
    assert refused.returncode == 2 and "no generator.json" in refused.stderr
