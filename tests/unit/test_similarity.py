"""Our SSIM is torchmetrics' SSIM: the same numbers on the images validation measures."""
import pytest
import torch

from pipeline.similarity import ssim

# the metrics extra's (LPIPS); the README's test command installs it
structural_similarity_index_measure = pytest.importorskip(
    "torchmetrics.functional.image").structural_similarity_index_measure


def uint8_like(generator: torch.Generator, shape: tuple) -> torch.Tensor:
    return torch.randint(0, 256, shape, generator=generator).float()


@pytest.mark.parametrize("shape", [(3, 3, 64, 64), (2, 1, 40, 96), (1, 3, 256, 128)])
def test_ssim_equals_torchmetrics_on_noise_and_on_a_blurred_copy(shape):
    generator = torch.Generator().manual_seed(sum(shape))
    images = uint8_like(generator, shape)
    near = (images + 20 * torch.randn(shape, generator=generator)).clamp(0, 255).round()
    for reference in (uint8_like(generator, shape), near, images):
        ours = ssim(images, reference, data_range=255.0)
        theirs = structural_similarity_index_measure(images, reference, data_range=255.0, reduction="none")
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert torch.allclose(ssim(images, images, data_range=255.0), torch.ones(shape[0]))


def test_the_trainer_path_imports_no_torchmetrics():
    import subprocess
    import sys
    code = "import sys, pipeline.train; print('torchmetrics' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
