"""FID / FD evaluation for training runs, through torch-fidelity.

``FIDEvaluator(dataset).score(images_uint8)``:

* ``cifar10`` / ``cifar100``: FID (Inception-v3 pool3, 2048-d, torch-fidelity's
  ``inception-v3-compat``) of the given samples against the **train** split
  (``cifar10-train`` / ``cifar100-train``; FID against the val split differs, so say which).
  Returns ``{"fid": x}``. The Inception weights come from ``weights_path`` (the trainer's
  ``--fid-weights PATH``), else the torch hub cache, else a download; when none works the
  evaluator warns ONCE, naming ``--fid-weights PATH``, and every ``score`` returns ``None`` so
  training continues without FID. No file here runs code: the weights are read once and their
  SHA-256 checked against the published one before torch-fidelity's extractor loads those same
  bytes (a wrong ``weights_path`` raises :class:`FIDWeightsError`; a wrong cached or downloaded
  file makes FID unavailable), and the reference statistics are our own ``.npz`` (mu, sigma of
  torch-fidelity's features) loaded with ``allow_pickle=False``, never torch-fidelity's
  ``torch.load(weights_only=False)`` cache.
* ``digits``: FD in the penultimate feature space of a small classifier trained on the
  digits train split (:mod:`.digits_classifier`), against that train split, through the
  same torch-fidelity path (custom feature extractor). Returns
  ``{"fd_digits": x, "fd_floor": y, "classifier_acc": z}``: ``fd_floor`` is the FD of the
  held-out real test images vs the train split (what a perfect generator would get with
  that many samples) and ``classifier_acc`` the classifier's held-out accuracy.
"""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
import urllib.request
import warnings
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from ..training.checkpoint import WriteError, atomic_write_bytes, read_regular
from ..training.registry import DATASETS
from . import digits_classifier as dc

INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
# SHA-256 of that release file (torch-fidelity 0.4.0's URL_INCEPTION_V3, the pt_inception-2015-12-05
# weights): torch-fidelity publishes its first 8 hex digits in the file name, torch hub's convention.
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
INCEPTION_FEATURES = "inception-v3-compat"
INCEPTION_LAYER = "2048"
FID_REFERENCES = {"cifar10": "cifar10-train", "cifar100": "cifar100-train"}


class FIDUnavailable(RuntimeError):
    """The feature extractor or the reference data cannot be had here."""


class FIDWeightsError(ValueError):
    """The Inception weights file given (``--fid-weights``) is not the published one."""


class UInt8ImageDataset(Dataset):
    """Wraps a uint8 (N, C, H, W) tensor as the Dataset torch-fidelity reads (C forced to ``channels``)."""

    def __init__(self, images: torch.Tensor, channels: Optional[int] = None) -> None:
        images = _as_uint8_nchw(images)
        if channels == 3 and images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        elif channels is not None and images.shape[1] != channels:
            raise ValueError(f"expected {channels}-channel images, got shape {tuple(images.shape)}")
        self.images = images.contiguous()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def _as_uint8_nchw(images) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        images = torch.as_tensor(images)
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 in 0..255, got {images.dtype}")
    if images.shape[0] < 2:
        raise ValueError("a Frechet distance needs at least 2 images")
    return images.detach().cpu()


def _wrong_digest(data: bytes) -> Optional[str]:
    """None when ``data`` are the published Inception weights, else their SHA-256."""
    digest = hashlib.sha256(data).hexdigest()
    return None if digest == INCEPTION_SHA256 else digest


def _download_inception(dst: Path, timeout: float = 30.0) -> None:
    """Fetch the torch-fidelity Inception weights to ``dst`` (the only network access here); a
    download whose SHA-256 is not the published one is never put there."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=str(dst.parent), suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(INCEPTION_URL, timeout=timeout) as resp:
            digest = hashlib.sha256()
            while True:
                chunk = resp.read(1 << 20)
                if not chunk:
                    break
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != INCEPTION_SHA256:
            raise ValueError(f"the download has sha256 {digest.hexdigest()}, not the published {INCEPTION_SHA256}")
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def resolve_inception_weights(weights_path: Optional[os.PathLike] = None) -> Path:
    """A local path of the Inception weights, or :class:`FIDUnavailable` saying why not (its
    content is checked by :func:`read_inception_weights`, which reads it once)."""
    if weights_path is not None:
        p = Path(weights_path)
        if not p.is_file():
            raise FIDUnavailable(f"the Inception weights file {p} given with --fid-weights does not exist")
        return p
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILENAME
    if cached.is_file():
        return cached
    try:
        _download_inception(cached)
    except Exception as e:  # offline, proxy, disk, a wrong download: all mean "no FID here"
        raise FIDUnavailable(f"the Inception weights are not in {cached} and could not be downloaded from "
                             f"{INCEPTION_URL} ({type(e).__name__}: {e})") from e
    return cached


def read_inception_weights(path: os.PathLike, given: bool = True) -> bytes:
    """The bytes of the Inception weights file ``path``, read once, after their SHA-256 matched the
    published one (so what is loaded is what was checked). A mismatch raises
    :class:`FIDWeightsError` for a file the user ``given`` (``--fid-weights``), else
    :class:`FIDUnavailable`; an unreadable file raises :class:`FIDUnavailable`."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as e:
        raise FIDUnavailable(f"the Inception weights file {path} cannot be read ({e.strerror or e})") from None
    digest = _wrong_digest(data)
    if digest is None:
        return data
    why = (f"the Inception weights file {path} is not torch-fidelity's pt_inception-2015-12-05 (sha256 "
           f"{digest[:16]}..., published {INCEPTION_SHA256[:16]}...); it was not loaded")
    if given:
        raise FIDWeightsError(f"{why}: pass the file from {INCEPTION_URL} with --fid-weights")
    raise FIDUnavailable(f"{why}: delete it to download it again")


def _inception_extractor(data: bytes):
    """torch-fidelity's Inception feature extractor, its weights loaded from ``data`` (checked bytes)."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    cls = FEATURE_EXTRACTORS_REGISTRY[INCEPTION_FEATURES]
    return cls(INCEPTION_FEATURES, [INCEPTION_LAYER], feature_extractor_weights_path=io.BytesIO(data))


def _load_statistics(path: Path) -> Optional[Dict[str, np.ndarray]]:
    """Cached reference statistics (``mu`` float32 (2048,), ``sigma`` float64 (2048, 2048), finite),
    or None when ``path`` is missing, not a regular file, or holds anything else (it is recomputed).
    ``allow_pickle=False``: no object array, so no code, is ever read."""
    try:  # a regular file only: never read through a link, never waiting on a FIFO
        data = read_regular(str(path))
    except OSError:
        return None
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            stats = {"mu": z["mu"], "sigma": z["sigma"]}
    except Exception:  # truncated, not an npz, object arrays, missing keys: recompute
        return None
    mu, sigma = stats["mu"], stats["sigma"]
    d = mu.shape[0] if mu.ndim == 1 else -1
    if not (mu.dtype == np.float32 and sigma.dtype == np.float64 and sigma.shape == (d, d)
            and np.isfinite(mu).all() and np.isfinite(sigma).all()):
        return None
    return stats


def _save_statistics(path: Path, stats: Dict[str, np.ndarray]) -> None:
    """Write the statistics atomically (a fresh temp file renamed over ``path``); a failure only warns."""
    buf = io.BytesIO()
    np.savez(buf, mu=stats["mu"], sigma=stats["sigma"])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(str(path), buf.getbuffer())
    except (OSError, WriteError) as e:  # mkdir's OSError, or the write's
        reason = e.reason if isinstance(e, WriteError) else e.strerror or e
        warnings.warn(f"could not cache the FID reference statistics in {path} ({reason})",
                      RuntimeWarning, stacklevel=2)


class FIDEvaluator:
    """Scores generated uint8 images against the training distribution (see module doc).

    ``num_samples`` is how many images the caller should generate (default 5000, as the
    paper's FID-5k); ``score`` uses all images it is given. CIFAR reference: the train split,
    from ``reference_images`` (uint8 (50000, 3, 32, 32), e.g. the trainer's own copy) or else
    torchvision's files under ``datasets_root`` (the official ``cifar-10-batches-py`` layout, so the
    trainer's ``--data-root`` works; ``download`` fetches them when missing). Reference statistics
    are cached as ``.npz`` under ``cache_dir/fidelity_cache``. Call ``score`` on one rank.
    """

    def __init__(self, dataset: str, weights_path: Optional[os.PathLike] = None, num_samples: int = 5000,
                 cache_dir: Optional[os.PathLike] = None, datasets_root: Optional[os.PathLike] = None,
                 download: bool = True, device: Optional[str] = None, batch_size: int = 200,
                 verbose: bool = False, reference_images: Optional[torch.Tensor] = None) -> None:
        if dataset not in DATASETS:
            raise ValueError(f"FIDEvaluator dataset must be one of {DATASETS}, got {dataset!r}")
        if int(num_samples) < 2:
            raise ValueError(f"num_samples must be >= 2, got {num_samples}")
        self.dataset = dataset
        self.weights_path = Path(weights_path) if weights_path is not None else None
        self.num_samples = int(num_samples)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else dc.default_cache_dir()
        self.datasets_root = Path(datasets_root) if datasets_root is not None else None
        self.download = bool(download)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = int(batch_size)
        self.verbose = bool(verbose)
        self.metric_name = "fd_digits" if dataset == "digits" else "fid"
        self.reference = "digits-train" if dataset == "digits" else FID_REFERENCES[dataset]
        self._prepared = False
        self.unavailable_reason: Optional[str] = None
        self._warned = False
        self._reference_input = None
        self._reference_images = reference_images
        self._extractor_path: Optional[Path] = None
        self._extractor = None  # CIFAR: torch-fidelity's Inception, built from checked bytes
        self._reference_stats: Optional[Dict[str, np.ndarray]] = None
        self._floor: Optional[float] = None
        self._classifier_acc: Optional[float] = None

    # -- setup --------------------------------------------------------------------------------
    def available(self) -> bool:
        """Prepares the evaluator (weights, reference data); False (after one warning) if it can't."""
        self._prepare()
        return self.unavailable_reason is None

    def _warn_once(self) -> None:
        if self._warned:
            return
        self._warned = True
        if self.dataset == "digits":
            msg = f"digits FD unavailable: {self.unavailable_reason}; training continues without FD."
        else:
            msg = (f"FID unavailable: {self.unavailable_reason}. Training continues without FID; to get FID, "
                   f"download {INCEPTION_URL} and pass --fid-weights PATH.")
        warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def _prepare(self) -> None:
        if self._prepared:
            return
        self._prepared = True
        try:
            import torch_fidelity  # noqa: F401
        except Exception as e:
            self.unavailable_reason = f"torch-fidelity is not installed ({e}); pip install torch-fidelity==0.4.0"
            self._warn_once()
            return
        try:
            if self.dataset == "digits":
                self._prepare_digits()
            else:
                self._prepare_cifar()
        except FIDUnavailable as e:
            self.unavailable_reason = str(e)
            self._warn_once()
        except FIDWeightsError as e:  # bad input, not a missing resource: the caller must hear it
            self.unavailable_reason = str(e)
            raise

    def _prepare_cifar(self) -> None:
        self._extractor_path = resolve_inception_weights(self.weights_path)
        data = read_inception_weights(self._extractor_path, given=self.weights_path is not None)
        try:
            self._extractor = _inception_extractor(data)
        except Exception as e:  # the published file always loads; this is torch-fidelity's own failure
            raise FIDUnavailable(f"torch-fidelity could not build Inception from {self._extractor_path} "
                                 f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
        del data
        if self._reference_images is not None:  # the caller's copy of the train split (e.g. data.load_dataset)
            self._reference_input = UInt8ImageDataset(self._reference_images, channels=3)
            return
        from torch_fidelity.datasets import Cifar10_RGB, Cifar100_RGB

        root = self.datasets_root or Path(torch.hub.get_dir()) / "fidelity_datasets"
        cls = Cifar10_RGB if self.dataset == "cifar10" else Cifar100_RGB
        try:
            root.mkdir(parents=True, exist_ok=True)
            self._reference_input = cls(str(root), train=True, download=self.download)
        except Exception as e:
            raise FIDUnavailable(f"the {self.dataset} train split (FID reference) is not under {root} and could "
                                 f"not be downloaded ({type(e).__name__}: {e})") from e

    def _prepare_digits(self) -> None:
        try:
            self._extractor_path = dc.ensure_classifier(self.weights_path, cache_dir=self.cache_dir)
            _, self._classifier_acc = dc.load_classifier(self._extractor_path)
        except (OSError, RuntimeError) as e:
            raise FIDUnavailable(f"no digits classifier ({e})") from e
        dc.register_digits_extractor()
        xtr, _, xte, _ = dc.load_digits_split()
        self._reference_input = UInt8ImageDataset(xtr)
        self._floor = self._frechet(UInt8ImageDataset(xte))

    # -- scoring ------------------------------------------------------------------------------
    def _frechet(self, input1: Dataset) -> float:
        import torch_fidelity

        if self.dataset != "digits":
            from torch_fidelity.metric_fid import fid_statistics_to_metric
            out = fid_statistics_to_metric(self._statistics(input1), self._reference_statistics(), self.verbose)
            return float(out[torch_fidelity.KEY_METRIC_FID])
        out = torch_fidelity.calculate_metrics(
            input1=input1, input2=self._reference_input, fid=True, feature_extractor=dc.FEATURE_EXTRACTOR_NAME,
            feature_extractor_weights_path=str(self._extractor_path), cache=False,
            cuda=self.device.startswith("cuda"), batch_size=self.batch_size, save_cpu_ram=True,
            verbose=self.verbose, samples_shuffle=False)
        return float(out[torch_fidelity.KEY_METRIC_FID])

    def _statistics(self, images: Dataset) -> Dict[str, np.ndarray]:
        """mu, sigma of the Inception pool features of ``images``, as torch-fidelity computes them."""
        from torch_fidelity.metric_fid import fid_featuresdict_to_statistics
        from torch_fidelity.utils import get_featuresdict_from_dataset

        cuda = self.device.startswith("cuda")
        if cuda and next(self._extractor.parameters()).device.type != "cuda":
            self._extractor.cuda()
        features = get_featuresdict_from_dataset(images, self._extractor, self.batch_size, cuda, True, self.verbose)
        return fid_featuresdict_to_statistics(features, INCEPTION_LAYER)

    def _reference_statistics(self) -> Dict[str, np.ndarray]:
        """The reference split's statistics: computed once, cached as ``cache_dir/fidelity_cache/*.npz``."""
        if self._reference_stats is None:
            name = (f"{self.reference}-n{len(self._reference_input)}-{INCEPTION_FEATURES}-"
                    f"{INCEPTION_SHA256[:8]}-stat-fid-{INCEPTION_LAYER}.npz")
            path = self.cache_dir / "fidelity_cache" / name
            stats = _load_statistics(path)
            if stats is None:
                stats = self._statistics(self._reference_input)
                _save_statistics(path, stats)
            self._reference_stats = stats
        return self._reference_stats

    def score(self, images_uint8: torch.Tensor) -> Optional[Dict[str, float]]:
        """FID / FD of ``images_uint8`` (uint8 (N, C, H, W)); None when unavailable (warned once)."""
        images_uint8 = _as_uint8_nchw(images_uint8)
        self._prepare()
        if self.unavailable_reason is not None:
            return None
        if self.dataset == "digits":
            value = self._frechet(UInt8ImageDataset(images_uint8))
            return {"fd_digits": value, "fd_floor": float(self._floor), "classifier_acc": float(self._classifier_acc)}
        return {"fid": self._frechet(UInt8ImageDataset(images_uint8, channels=3))}

    @property
    def floor(self) -> Optional[float]:
        self._prepare()
        return self._floor

    @property
    def classifier_acc(self) -> Optional[float]:
        self._prepare()
        return self._classifier_acc
