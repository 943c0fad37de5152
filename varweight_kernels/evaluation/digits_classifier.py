"""A small classifier on scikit-learn's 8x8 digits whose penultimate layer is the feature
space for a Frechet distance on the ``digits`` dataset (an "FID" for images Inception was
never meant to see).

* Data: ``sklearn.datasets.load_digits`` (1797 images, values 0..16), split with
  ``train_test_split(test_size=0.25, random_state=0, stratify=y)`` into 1347 train and
  450 held-out test images. Pixels are stored as uint8 ``round(v * 255 / 16)``, shape
  (N, 1, 8, 8): the representation the digits training data is compared in.
* Model (:class:`DigitsNet`): 64 -> 128 -> ReLU -> 64 -> ReLU (the *penultimate*
  features, 64-d) -> 10 logits. Trained deterministically (seeded init, full-batch Adam,
  fixed number of epochs, no shuffling), so the same weights come out on every machine up to
  float rounding; the trained weights are cached (``~/.cache/varweight`` or a given folder).
* :class:`FeatureExtractorDigits` plugs the classifier into torch-fidelity
  (registered as ``"varweight-digits"``), so FD on digits and FID on CIFAR share one path.

Input images of any size / channel count are converted to gray and area-resized to 8x8.
Run ``python -m varweight_kernels.evaluation.digits_classifier [--cache-dir DIR]`` to
(re)build the cached weights and print the held-out accuracy.
"""
from __future__ import annotations

import argparse
import io
import os
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..training.checkpoint import atomic_write_bytes

CLASSIFIER_VERSION = 1
WEIGHTS_FILENAME = f"digits_classifier_v{CLASSIFIER_VERSION}.pt"
FEATURE_EXTRACTOR_NAME = "varweight-digits"
FEATURE_LAYER = "penultimate"
TRAIN_SEED = 0
SPLIT_SEED = 0
EPOCHS = 150
LR = 1e-2
WEIGHT_DECAY = 1e-4


def default_cache_dir() -> Path:
    env = os.environ.get("VARWEIGHT_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "varweight"


def load_digits_split() -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test); x uint8 (N, 1, 8, 8) in 0..255, y int64."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = np.rint(d.images.astype(np.float64) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=SPLIT_SEED, stratify=y)
    as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return as_t(xtr).unsqueeze(1), as_t(ytr), as_t(xte).unsqueeze(1), as_t(yte)


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) (or float in 0..255) -> float32 (N, 64) in [0, 1], gray, 8x8."""
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(images.shape)}")
    x = images.to(torch.float32) / 255.0
    if x.shape[1] != 1:
        x = x.mean(dim=1, keepdim=True)
    h, w = x.shape[-2:]
    if (h, w) != (8, 8):
        if h % 8 == 0 and w % 8 == 0:
            x = F.adaptive_avg_pool2d(x, (8, 8))
        else:
            x = F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False, antialias=True)
    return x.flatten(1)


class DigitsNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 64)
        self.head = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc2(F.relu(self.fc1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _init_deterministic(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            bound = 1.0 / np.sqrt(m.in_features)
            with torch.no_grad():
                m.weight.copy_(torch.empty_like(m.weight).uniform_(-bound, bound, generator=g) * np.sqrt(3.0))
                m.bias.zero_()


def train_classifier(seed: int = TRAIN_SEED, epochs: int = EPOCHS) -> Tuple[DigitsNet, float]:
    """Train on the train split; returns (model in eval mode, held-out test accuracy)."""
    xtr, ytr, xte, yte = load_digits_split()
    model = DigitsNet()
    _init_deterministic(model, seed)
    opt = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    inputs = preprocess(xtr)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest and keeps the result thread-count free
    try:
        for _ in range(epochs):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(inputs), ytr).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return model, accuracy(model, xte, yte)


@torch.no_grad()
def accuracy(model: DigitsNet, images: torch.Tensor, labels: torch.Tensor) -> float:
    pred = model(preprocess(images)).argmax(dim=1)
    return float((pred == labels).to(torch.float64).mean())


def save_classifier(model: DigitsNet, test_acc: float, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"version": CLASSIFIER_VERSION, "test_acc": float(test_acc),
            "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
    buf = io.BytesIO()
    torch.save(blob, buf)
    atomic_write_bytes(str(path), buf.getbuffer())  # a fresh unguessable temp file, never through a link


def load_classifier(path: Path) -> Tuple[DigitsNet, float]:
    blob = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("version") != CLASSIFIER_VERSION:
        raise RuntimeError(f"{path} is not a version-{CLASSIFIER_VERSION} digits classifier file")
    model = DigitsNet()
    model.load_state_dict(blob["state_dict"])
    model.eval()
    return model, float(blob["test_acc"])


def ensure_classifier(path: Optional[os.PathLike] = None, cache_dir: Optional[os.PathLike] = None) -> Path:
    """Path of a usable classifier weights file: ``path`` if given (must exist), else the cached
    file in ``cache_dir`` (default :func:`default_cache_dir`), trained and written if missing."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"digits classifier weights {path} do not exist")
        return path
    target = Path(cache_dir or default_cache_dir()) / WEIGHTS_FILENAME
    if target.is_file():
        try:
            load_classifier(target)
            return target
        except Exception:  # stale / corrupt cache: rebuild
            pass
    model, acc = train_classifier()
    save_classifier(model, acc, target)
    return target


# -- torch-fidelity plug-in -------------------------------------------------------------------
try:
    from torch_fidelity import FeatureExtractorBase as _FEBase
except Exception:  # torch-fidelity missing: the class is still importable for plain use
    _FEBase = nn.Module  # type: ignore[assignment,misc]


class FeatureExtractorDigits(_FEBase):  # type: ignore[misc,valid-type]
    """torch-fidelity feature extractor: uint8 images -> DigitsNet penultimate features."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        path = ensure_classifier(feature_extractor_weights_path)
        self.net, self.test_acc = load_classifier(path)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list():
        return (FEATURE_LAYER, "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return FEATURE_LAYER if metric in ("fid", "kid", "prc") else "logits"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 1, 8, 8, dtype=torch.uint8)

    def forward(self, x):
        x = preprocess(x).to(next(self.net.parameters()).device)
        feats = self.net.features(x)
        out = {FEATURE_LAYER: feats, "logits": self.net.head(feats)}
        return tuple(out[name].to(torch.float32) for name in self.features_list)


def register_digits_extractor() -> str:
    """Register :class:`FeatureExtractorDigits` with torch-fidelity (idempotent); returns its name."""
    from torch_fidelity import register_feature_extractor
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if FEATURE_EXTRACTORS_REGISTRY.get(FEATURE_EXTRACTOR_NAME) is not FeatureExtractorDigits:
        FEATURE_EXTRACTORS_REGISTRY.pop(FEATURE_EXTRACTOR_NAME, None)
        register_feature_extractor(FEATURE_EXTRACTOR_NAME, FeatureExtractorDigits)
    return FEATURE_EXTRACTOR_NAME


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Train/cache the digits FD classifier and print its accuracy.")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--force", action="store_true", help="retrain even if a cached file exists")
    args = ap.parse_args(argv)
    target = Path(args.cache_dir or default_cache_dir()) / WEIGHTS_FILENAME
    if args.force and target.exists():
        target.unlink()
    path = ensure_classifier(cache_dir=args.cache_dir)
    _, acc = load_classifier(path)
    print(f"digits classifier: {path} (held-out test accuracy {acc:.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
