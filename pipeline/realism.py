"""Metrics that see realism, beside evaluate.py's pairwise L1, PSNR and SSIM: FID and KID
from torch-fidelity, LPIPS from torchmetrics (`pip install -e '.[metrics]'`).

One convention each, stated in metrics.json too:
- Every metric measures the uint8 images a user saves (evaluate.to_uint8, the reference's
  truncation), so the same numbers come from the libraries' own tools on folders of those
  PNGs. One-channel images are repeated to three.
- FID, KID: torch-fidelity's: its Inception-v3 ported from TensorFlow (the 2015-12-05
  weights), its TensorFlow-1 bilinear resize to 299 x 299, the 2048-d pool features, real =
  the targets, fake = the outputs. KID: torch-fidelity's polynomial kernel (degree 3), 100
  subsets of min(1000, N) images (the libraries' 1000 refuses a 100-500-image val split),
  its RNG seed. Not torchmetrics' FID, which resizes with antialiasing (neither convention).
- LPIPS: torchmetrics' (AlexNet backbone, the v0.1 linear layers that ship with
  torchmetrics), between each output and its target on [-1, 1], averaged over the pairs.

Weights live under one folder laid out as torch.hub does (INCEPTION_FILE, ALEXNET_FILE, and
VGG19_FILE for the trainer's loss.lambda_vgg): --weights-dir /
eval.weights_dir, else $P2P_WEIGHTS_DIR, else torch's own cache ($TORCH_HOME). evaluate.py
downloads a missing file there where it may; the trainer never downloads.

Written here, not taken from a library: the per-rank accumulation with all ranks' features
gathered in sample-key order (one result, the same on any number of processes) and the
offline weights lookup. The features and the distances are the libraries' own functions.
"""
from __future__ import annotations

import difflib
import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.errors import UserError

log = logging.getLogger(__name__)

WEIGHTS_ENV = "P2P_WEIGHTS_DIR"
INCEPTION_FILE = "hub/checkpoints/weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's
ALEXNET_FILE = "hub/checkpoints/alexnet-owt-7be5be79.pth"  # torchvision's AlexNet IMAGENET1K_V1
VGG19_FILE = "hub/checkpoints/vgg19-dcbb9e9d.pth"  # torchvision's VGG19 IMAGENET1K_V1
EXTRA = "pip install -e '.[metrics]'"
KID_SUBSETS, KID_MAX_SUBSET = 100, 1000


@dataclass(frozen=True)
class Metric:
    help: str
    higher_is_better: bool = False
    needs: tuple[str, ...] = ()  # modules it imports (the [metrics] extra)
    weights: str | None = None  # file under the weights folder
    key: str = ""  # its value's key in the results (default: the name)


METRICS = {
    "l1": Metric("mean |output - target| on the [-1, 1] scale"),
    "psnr": Metric("PSNR of the uint8 images, dB", higher_is_better=True),
    "ssim": Metric("SSIM of the uint8 images", higher_is_better=True),
    "fid": Metric("Frechet Inception distance, torch-fidelity's convention",
                  needs=("torch_fidelity", "torchvision"), weights=INCEPTION_FILE),
    "kid": Metric("kernel Inception distance, torch-fidelity's (kid_mean, kid_std)",
                  needs=("torch_fidelity", "torchvision"), weights=INCEPTION_FILE, key="kid_mean"),
    "lpips": Metric("LPIPS (AlexNet, v0.1) between each output and its target, averaged",
                    needs=("torchmetrics", "torchvision"), weights=ALEXNET_FILE),
}
PAIRWISE = ("l1", "psnr", "ssim")  # evaluate.py's own, always available


class MetricsError(UserError, ValueError):
    """A metric that cannot be computed here; the message says what to install or put where."""


def value_key(name: str) -> str:
    return METRICS[name].key or name


def better(name: str, new: float, old: float | None) -> bool:
    if old is None:
        return True
    return new > old if METRICS[name].higher_is_better else new < old


def weights_dir(explicit: str = "") -> str:
    """--weights-dir, else $P2P_WEIGHTS_DIR, else torch's cache ($TORCH_HOME, ~/.cache/torch)."""
    return explicit or os.environ.get(WEIGHTS_ENV) or os.path.dirname(torch.hub.get_dir())


def missing_package(name: str) -> str | None:
    absent = [m for m in METRICS[name].needs if importlib.util.find_spec(m) is None]
    return f"{name} needs {', '.join(absent)}: {EXTRA}" if absent else None


def missing(name: str, root: str) -> str | None:
    """Why `name` cannot be computed from `root` without a download (None: it can)."""
    weights = METRICS[name].weights
    if why := missing_package(name):
        return why
    if weights and not os.path.isfile(os.path.join(root, weights)):
        return _missing_weights(name, root)
    return None


def _missing_weights(name: str, root: str) -> str:
    path = os.path.join(root, METRICS[name].weights)
    return (f"{name} needs {os.path.basename(path)} in {os.path.dirname(path)}/ (torch.hub's layout): "
            f"copy it there, pass --weights-dir / eval.weights_dir (or set ${WEIGHTS_ENV}) to the "
            "folder that holds hub/checkpoints/, or run p2p-evaluate once where it can download")


def parse(spec: str) -> list[str] | None:
    """The names of a comma list (None for 'auto'); MetricsError for an unknown one."""
    if spec.strip() == "auto":
        return None
    names = [n.strip() for n in spec.split(",") if n.strip()]
    for name in names:
        if name not in METRICS:
            close = difflib.get_close_matches(name, list(METRICS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise MetricsError(f"unknown metric {name!r}{hint}: choose from auto or {', '.join(METRICS)}")
    if not names:
        raise MetricsError("no metric named: give 'auto' or a comma list such as l1,psnr,ssim,fid")
    return list(dict.fromkeys(names))


def choose(spec: str, root: str, allow_download: bool = False) -> list[str]:
    """The metric names `spec` asks for: 'auto' = the pairwise ones plus every metric
    whose package and weights are here; else a comma list, each checked (MetricsError:
    unknown, a package missing, or weights missing where no download is allowed)."""
    names = parse(spec)
    if names is None:
        return list(PAIRWISE) + [n for n in METRICS if n not in PAIRWISE and missing(n, root) is None]
    for name in names:
        why = missing_package(name) or (None if allow_download else missing(name, root))
        if why:
            raise MetricsError(why)
    return names


# --------------------------------------------------------------------------- weights

def weights_url(name: str) -> str:
    """Where the library that owns `name`'s weights downloads them from."""
    if METRICS[name].weights == INCEPTION_FILE:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
        return URL_INCEPTION_V3
    from torchvision.models import AlexNet_Weights
    return AlexNet_Weights.IMAGENET1K_V1.url


def download_missing(names: list[str], root: str) -> None:
    """Download the weights `names` need that `root` lacks (atomically: a temp file, then
    a rename, so processes doing it at once are safe); MetricsError naming the file and
    where to put it when that fails (offline, a proxy, a firewall)."""
    for name in names:
        weights = METRICS[name].weights
        path = os.path.join(root, weights) if weights else None
        if path is None or os.path.isfile(path):
            continue
        url = weights_url(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        log.info(f"downloading {url} to {path}")
        try:
            torch.hub.download_url_to_file(url, path, progress=True)
        except OSError as err:  # URLError included
            raise MetricsError(f"cannot download {url} ({getattr(err, 'reason', err)}); "
                               + _missing_weights(name, root)) from None


def local_weights(name: str, root: str) -> str:
    path = os.path.join(root, METRICS[name].weights)
    if not os.path.isfile(path):
        raise MetricsError(_missing_weights(name, root))
    return path


def load_inception(root: str, device: torch.device) -> torch.nn.Module:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    path = local_weights("fid", root)
    try:  # torch-fidelity unpickles the file as it is; refuse one that holds more than tensors
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure: the same advice
        raise MetricsError(f"{path} is not a weights-only state dict ({type(err).__name__}); "
                           "replace it with torch-fidelity's file") from None
    return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                       feature_extractor_weights_path=path).to(device)


def load_lpips(root: str, device: torch.device) -> torch.nn.Module:
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
    local_weights("lpips", root)
    previous = torch.hub.get_dir()
    torch.hub.set_dir(os.path.join(root, "hub"))  # where torchvision looks for the backbone
    try:
        metric = LearnedPerceptualImagePatchSimilarity(net_type="alex", reduction="none")
    finally:
        torch.hub.set_dir(previous)
    return metric.to(device).eval()


def missing_vgg19(root: str) -> str | None:
    """Why loss.lambda_vgg cannot load its VGG19 from `root` (None: it can), without
    reading the file."""
    if importlib.util.find_spec("torchvision") is None:
        return f"loss.lambda_vgg needs torchvision: {EXTRA}"
    path = os.path.join(root, VGG19_FILE)
    if not os.path.isfile(path):
        get = "import torchvision; torchvision.models.vgg19(weights='IMAGENET1K_V1')"
        return (f"loss.lambda_vgg needs {os.path.basename(path)} in {os.path.dirname(path)}/: "
                f"python -c \"{get}\" puts it in torch's cache; or set eval.weights_dir (or "
                f"${WEIGHTS_ENV}) to the folder that holds hub/checkpoints/")
    return None


def load_vgg19_features(root: str) -> torch.nn.Module:
    """torchvision's VGG19 convolutional part (`features`) with the ImageNet weights from
    the weights folder, for loss.lambda_vgg; MetricsError saying how to get them."""
    if why := missing_vgg19(root):
        raise MetricsError(why)
    from torchvision.models.vgg import cfgs, make_layers
    path = os.path.join(root, VGG19_FILE)
    features = make_layers(cfgs["E"])  # VGG19's layers, without the 120M-parameter classifier
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        features.load_state_dict({k.removeprefix("features."): v for k, v in state.items()
                                  if k.startswith("features.")})
    except RuntimeError as err:
        raise MetricsError(f"{path}: not torchvision's VGG19 weights ({str(err).splitlines()[0]})") from None
    return features


# --------------------------------------------------------------------------- accumulation

def as_rgb(images_u8: torch.Tensor) -> torch.Tensor:
    if images_u8.shape[1] == 1:
        return images_u8.expand(-1, 3, -1, -1)
    if images_u8.shape[1] != 3:
        raise MetricsError(f"FID, KID and LPIPS measure 1- or 3-channel images, these have "
                           f"{images_u8.shape[1]}")
    return images_u8


@dataclass
class Row:
    """One image's contribution: its key, Inception features of target and output, LPIPS."""
    key: str
    real: torch.Tensor | None
    fake: torch.Tensor | None
    lpips: float | None


class Realism:
    """FID, KID and LPIPS over a split: `add` each batch on every rank, then `result`
    once with a `gather` that returns every rank's list (distributed.gather_objects).
    The targets' features are kept by key: the trainer's next validation reuses them."""

    def __init__(self, names: list[str], device: torch.device, root: str):
        self.names = [n for n in names if n not in PAIRWISE]
        self.device = device
        wants_inception = bool({"fid", "kid"} & set(self.names))
        self.inception = load_inception(root, device) if wants_inception else None
        self.lpips_net = load_lpips(root, device) if "lpips" in self.names else None
        self.real_features: dict[str, torch.Tensor] = {}
        self.rows: list[Row] = []

    def __bool__(self) -> bool:
        return bool(self.names)

    @torch.no_grad()
    def add(self, keys: list[str], output_u8: torch.Tensor, target_u8: torch.Tensor) -> list[float | None]:
        """Record a batch of outputs and targets (uint8); returns each pair's LPIPS."""
        fake = real = [None] * len(keys)
        if self.inception is not None:
            fake = [self.features(image) for image in output_u8]
            for key, image in zip(keys, target_u8):
                if key not in self.real_features:
                    self.real_features[key] = self.features(image)
            real = [self.real_features[k] for k in keys]
        scores = self.lpips_each(output_u8, target_u8)
        self.rows += [Row(k, r, f, s) for k, r, f, s in zip(keys, real, fake, scores)]
        return scores

    def features(self, image_u8: torch.Tensor) -> torch.Tensor:
        """One image's 2048 Inception features, alone in its forward: the same on any
        number of processes and batch sizes (a kernel may round a batch differently)."""
        return self.inception(as_rgb(image_u8[None]).to(self.device))[0][0].cpu()

    @torch.no_grad()
    def lpips_each(self, output_u8: torch.Tensor, target_u8: torch.Tensor) -> list[float | None]:
        if self.lpips_net is None:
            return [None] * len(output_u8)
        to_signed = lambda t: as_rgb(t[None]).to(self.device).float() / 127.5 - 1
        scores = []
        for output, target in zip(output_u8, target_u8):  # alone in its forward, as above
            scores.append(float(self.lpips_net(to_signed(output), to_signed(target)).reshape(-1)[0]))
            self.lpips_net.reset()
        return scores

    def discard(self) -> None:
        """Forget the rows of an evaluation that was abandoned."""
        self.rows = []

    def result(self, gather: Callable[[list], list[list]] = lambda rows: [rows]) -> dict:
        """The metrics over every rank's rows, in key order; clears the rows."""
        rows = sorted((r for part in gather(self.rows) for r in part), key=lambda r: r.key)
        self.rows = []
        n = len(rows)
        if len({r.key for r in rows}) != n:
            raise RuntimeError("an image was evaluated twice: the ranks' splits overlap")
        out: dict = {}
        if self.inception is not None:
            real = torch.stack([r.real for r in rows]) if rows else None
            fake = torch.stack([r.fake for r in rows]) if rows else None
            if "fid" in self.names:
                out.update(fid=_fid(real, fake, n), fid_images=n)
            if "kid" in self.names:
                out.update(_kid(real, fake, n))
        if "lpips" in self.names:
            out.update(lpips=sum(r.lpips for r in rows) / n if n else None, lpips_images=n)
        return out


def _fid(real: torch.Tensor | None, fake: torch.Tensor | None, n: int) -> float | None:
    if n < 2:
        return None  # a covariance needs two images
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    value = fid_statistics_to_metric(fid_features_to_statistics(real), fid_features_to_statistics(fake),
                                     verbose=False)
    return value["frechet_inception_distance"]


def _kid(real: torch.Tensor | None, fake: torch.Tensor | None, n: int) -> dict:
    subset = min(KID_MAX_SUBSET, n)
    out = {"kid_mean": None, "kid_std": None, "kid_subset_size": subset,
           "kid_subsets": KID_SUBSETS, "kid_images": n}
    if subset >= 2:  # the unbiased estimate needs two per subset
        from torch_fidelity.metric_kid import kid_features_to_metric
        value = kid_features_to_metric(real, fake, kid_subsets=KID_SUBSETS, kid_subset_size=subset,
                                       verbose=False)
        out.update(kid_mean=value["kernel_inception_distance_mean"],
                   kid_std=value["kernel_inception_distance_std"])
    return out
