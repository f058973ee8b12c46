"""FID, KID and LPIPS (pipeline/realism.py) on substitute weights: zero on identical images,
growing with noise, equal to torch-fidelity's and torchmetrics' own numbers on the same
images, the weights found offline or a one-line error naming the file, a missing package
naming the extra. The substitute weights only show the plumbing: no model is ranked here."""
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from pipeline import realism
from pipeline.config import ConfigError, from_cli
from pipeline.evaluate import main as evaluate_main
from tests.helpers.substitute_weights import generated_images
from tests.helpers.trainer_runs import ROOT

N = 6
KEYS = [f"pair_{i:03d}" for i in range(N)]


@pytest.fixture(scope="module")
def meter(substitute_weights):
    return realism.Realism(["fid", "kid", "lpips"], torch.device("cpu"), substitute_weights)


@pytest.fixture(scope="module")
def targets():
    return generated_images(N, size=48, seed=3)


def noisy(images: torch.Tensor, level: float) -> torch.Tensor:
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(7))
    return (images.float() + level * noise).clamp(0, 255).to(torch.uint8)


def test_the_weight_files_are_the_ones_the_libraries_download():
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    from torchvision.models import AlexNet_Weights
    assert os.path.basename(realism.INCEPTION_FILE) == os.path.basename(URL_INCEPTION_V3)
    assert os.path.basename(realism.ALEXNET_FILE) == os.path.basename(AlexNet_Weights.IMAGENET1K_V1.url)


@pytest.mark.slow  # Inception-v3 at 299 x 299 on the CPU, and the weights written once
def test_zero_on_identical_images_and_growing_with_noise(meter, targets):
    results = []
    for level in (0, 8, 24, 64):
        meter.add(KEYS, noisy(targets, level), targets)
        results.append(meter.result())
    same = results[0]
    assert abs(same["fid"]) < 1e-3 and same["lpips"] == 0.0
    # KID's unbiased estimate is not 0 on identical sets of a few images (the diagonal it
    # leaves out): small against what noise gives, and below every noisy value
    assert abs(same["kid_mean"]) < 0.01 * results[-1]["kid_mean"]
    for key in ("fid", "kid_mean", "lpips"):
        values = [r[key] for r in results]
        assert values == sorted(values) and len(set(values)) == 4, (key, values)
    assert same["kid_subset_size"] == N and same["fid_images"] == same["lpips_images"] == N


@pytest.mark.slow  # Inception-v3 at 299 x 299 on the CPU, and the weights written once
def test_fid_kid_lpips_equal_the_libraries_on_the_same_images(meter, targets, substitute_weights, tmp_path):
    """Our numbers against torch-fidelity's own on two folders of PNGs, and torchmetrics'
    LPIPS, with the same weights."""
    import torch_fidelity
    from torchmetrics.functional.image import learned_perceptual_image_patch_similarity as lpips
    outputs = noisy(targets, 16)
    for name, images in (("real", targets), ("fake", outputs)):
        (tmp_path / name).mkdir()
        for key, image in zip(KEYS, images):
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / name / f"{key}.png")
    theirs = torch_fidelity.calculate_metrics(
        input1=str(tmp_path / "real"), input2=str(tmp_path / "fake"), fid=True, kid=True, cuda=False,
        kid_subset_size=N, verbose=False,
        feature_extractor_weights_path=os.path.join(substitute_weights, realism.INCEPTION_FILE))
    meter.add(KEYS, outputs, targets)
    ours = meter.result()
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-3)
    assert ours["kid_mean"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-3)
    previous = torch.hub.get_dir()
    torch.hub.set_dir(os.path.join(substitute_weights, "hub"))
    try:
        signed = lambda t: t.float() / 127.5 - 1
        reference = lpips(signed(outputs), signed(targets), net_type="alex", reduction="mean")
    finally:
        torch.hub.set_dir(previous)
    assert ours["lpips"] == pytest.approx(reference.item(), rel=1e-4)


@pytest.mark.slow  # Inception-v3 at 299 x 299 on the CPU, and the weights written once
def test_the_result_is_the_same_whatever_the_order_ranks_send(meter, targets):
    """Two 'ranks' holding halves in either order give the single-process numbers."""
    outputs = noisy(targets, 16)
    meter.add(KEYS, outputs, targets)
    whole = meter.result()
    meter.add(KEYS[:2], outputs[:2], targets[:2])
    first = meter.rows
    meter.rows = []
    meter.add(KEYS[2:], outputs[2:], targets[2:])
    assert meter.result(lambda second: [second, first]) == whole


def test_auto_takes_what_is_here_and_a_named_metric_must_be(substitute_weights, tmp_path):
    assert realism.choose("auto", substitute_weights) == list(realism.METRICS)
    assert realism.choose("auto", str(tmp_path)) == ["l1", "psnr", "ssim"]
    with pytest.raises(realism.MetricsError) as err:
        realism.choose("l1,fid", str(tmp_path))
    message = str(err.value)
    assert "\n" not in message and os.path.basename(realism.INCEPTION_FILE) in message
    assert str(tmp_path / "hub" / "checkpoints") in message and realism.WEIGHTS_ENV in message
    assert realism.choose("l1,fid", str(tmp_path), allow_download=True) == ["l1", "fid"]


def test_evaluate_offline_without_the_weights_is_one_line_naming_the_file(tmp_path, capsys):
    code = evaluate_main(["--checkpoint", str(tmp_path), "--data", str(tmp_path), "--out", str(tmp_path),
                          "--metrics", "fid,lpips", "--weights-dir", str(tmp_path), "--no-download"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "--metrics: fid needs weights-inception-2015-12-05-6726825d.pth" in err


def without_package(tmp_path, package: str) -> dict:
    """An environment whose Python really lacks `package`: site-packages seen through a
    folder of links to everything else (python -S reads no .pth files)."""
    import site
    view = tmp_path / "site"
    view.mkdir()
    for folder in site.getsitepackages():
        for entry in os.listdir(folder):
            if not entry.startswith(package) and not (view / entry).exists():
                (view / entry).symlink_to(os.path.join(folder, entry))
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{view}"}


def test_a_metric_without_its_package_names_the_extra(tmp_path):
    args = ["--checkpoint", "x", "--data", "x", "--out", "x", "--metrics", "kid"]
    result = subprocess.run([sys.executable, "-S", "-m", "pipeline.evaluate", *args], cwd=tmp_path,
                            env=without_package(tmp_path, "torch_fidelity"), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().endswith("kid needs torch_fidelity: pip install -e '.[metrics]'")


def test_config_names_metrics_and_the_best_metric_checked():
    with pytest.raises(ConfigError, match=r"eval.metrics: unknown metric 'fdi' \(did you mean 'fid'\?\)"):
        from_cli(["--eval.metrics=l1,fdi"])
    with pytest.raises(ConfigError, match="train.best_metric: lpips is not among eval.metrics"):
        from_cli(["--eval.metrics=l1,fid", "--train.best_metric=lpips", "--data.val=x"])
    with pytest.raises(ConfigError, match="train.best_metric: 'psnrr' is not one of"):
        from_cli(["--train.best_metric=psnrr"])
    assert realism.better("psnr", 20.0, 19.0) and realism.better("fid", 10.0, 12.0)
    assert not realism.better("ssim", 0.4, 0.5) and realism.better("l1", 0.3, None)


def test_vgg19_weights_load_from_the_weights_folder_or_say_how_to_get_them(substitute_weights, tmp_path):
    from torchvision.models import VGG19_Weights
    assert os.path.basename(realism.VGG19_FILE) == os.path.basename(VGG19_Weights.IMAGENET1K_V1.url)
    features = realism.load_vgg19_features(substitute_weights)
    saved = torch.load(os.path.join(substitute_weights, realism.VGG19_FILE), weights_only=True)
    assert all(saved[f"features.{k}"].equal(v) for k, v in features.state_dict().items())
    with pytest.raises(realism.MetricsError, match=r"vgg19-dcbb9e9d.pth in .*IMAGENET1K_V1.*weights_dir"):
        realism.load_vgg19_features(str(tmp_path))
    wrong = tmp_path / realism.VGG19_FILE
    wrong.parent.mkdir(parents=True)
    torch.save({"features.0.weight": torch.zeros(1)}, wrong)
    with pytest.raises(realism.MetricsError, match="not torchvision's VGG19 weights"):
        realism.load_vgg19_features(str(tmp_path))
