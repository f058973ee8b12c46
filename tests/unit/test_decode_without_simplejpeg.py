"""simplejpeg is a speed-up, not a requirement: without it (a bare GPU image) the package
imports, and JPEGs decode through PIL to the same pixels."""
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pipeline.data import decode
from tests.helpers.images import image_bytes
from tests.helpers.trainer_runs import ROOT


@pytest.fixture
def without_simplejpeg(monkeypatch):
    """Decode as on a machine where `import simplejpeg` fails."""
    monkeypatch.setitem(sys.modules, "simplejpeg", None)
    decode._simplejpeg.cache_clear()
    yield
    decode._simplejpeg.cache_clear()


def jpegs() -> list[bytes]:
    """Colour JPEGs in the usual chroma subsamplings (4:2:0, 4:4:4, 4:2:2), odd sizes,
    a progressive one and a grayscale one: smooth noise, as photos are."""
    rng = np.random.default_rng(0)

    def smooth(shape):
        small = rng.integers(0, 256, (shape[0] // 3 + 1, shape[1] // 3 + 1, *shape[2:]), dtype=np.uint8)
        return np.asarray(Image.fromarray(small).resize((shape[1], shape[0]), Image.BILINEAR))

    return [image_bytes(smooth((45, 67, 3)), "JPEG", quality=90),
            image_bytes(smooth((64, 64, 3)), "JPEG", quality=75, subsampling=0),
            image_bytes(smooth((17, 33, 3)), "JPEG", quality=50, subsampling=1),
            image_bytes(smooth((40, 40, 3)), "JPEG", quality=95, progressive=True),
            image_bytes(smooth((31, 50)), "JPEG", quality=85)]


def decode_all(channels: int) -> list[np.ndarray]:
    return [decode.decode_image(data, "jpg", channels) for data in jpegs()]


@pytest.mark.parametrize("channels", [1, 3])
def test_pil_decodes_the_same_jpeg_pixels_as_simplejpeg(channels):
    decode._simplejpeg.cache_clear()
    assert decode._simplejpeg() is not None, "simplejpeg is a test dependency"
    fast = decode_all(channels)
    sys.modules["simplejpeg"] = None
    try:
        decode._simplejpeg.cache_clear()
        fallback = decode_all(channels)
    finally:
        del sys.modules["simplejpeg"]
        decode._simplejpeg.cache_clear()
    for a, b in zip(fast, fallback):
        assert a.shape == b.shape and a.shape[2] == channels
        assert np.array_equal(a, b)


def test_a_corrupt_jpeg_is_a_bad_sample_without_simplejpeg(without_simplejpeg):
    with pytest.raises(decode.BadSample, match="corrupt_image"):
        decode.decode_image(b"\xff\xd8\xff\xe0 not a jpeg", "jpg", 3)


def test_the_trainer_imports_where_simplejpeg_is_missing():
    code = "import sys; sys.modules['simplejpeg'] = None; import pipeline.train, pipeline.translate"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
