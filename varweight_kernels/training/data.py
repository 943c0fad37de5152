"""Datasets for the diffusion trainer and a deterministic, resumable batch iterator.

``load_dataset(name, root="./data", download=False, split="train") -> (uint8 NCHW tensor,
num_classes)`` for:

- "cifar10" / "cifar100": the official python-version archives (cifar-10-python.tar.gz,
  cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/), extracted under ``root``
  (torchvision's layout: ``root/cifar-10-batches-py``, ``root/cifar-100-python``) and read by
  this module with the file names and published MD5s of ``torchvision.datasets.CIFAR10/100``:
  each batch file is read once, and its bytes are unpickled only if their MD5 matches, so a
  folder holding other pickles is refused, never loaded. An archive found
  under ``root`` (or fetched with ``download=True``) is checked against its MD5 and extracted.
- "digits": scikit-learn's bundled 8x8 digits (1797 images, 1 channel), 0..16 scaled to 0..255.

A missing or corrupted dataset raises ``DatasetUnavailable``, naming the options.
"""
from __future__ import annotations

import hashlib
import os
import tarfile
from typing import Optional, Tuple

import torch

from .registry import DATASETS
from .checkpoint import read_regular

__all__ = ["DatasetUnavailable", "DATASETS", "load_dataset", "to_model_range", "from_model_range",
           "BatchIterator"]


class DatasetUnavailable(RuntimeError):
    """The dataset files are not under the data root and downloading was not requested (or failed)."""


_CIFAR = {"cifar10": ("CIFAR10", 10), "cifar100": ("CIFAR100", 100)}


def _md5(path: str) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cifar_class(name: str):
    try:
        import torchvision.datasets as tvd
    except ImportError as exc:
        raise DatasetUnavailable(f"{name} needs torchvision (pip install torchvision): {exc}") from None
    return getattr(tvd, _CIFAR[name][0])


def _unavailable(cls, name: str, root: str, detail: str) -> DatasetUnavailable:
    return DatasetUnavailable(
        f"{name} is not available under {os.path.abspath(root)!r} ({detail}). Put the official archive "
        f"{cls.filename} (or its extracted folder {cls.base_folder}/) there and point "
        f"--data-root at it, pass --download to fetch it from {cls.url}, or run offline with "
        f"--dataset digits (bundled with scikit-learn).")


def _extract_archive(cls, name: str, root: str, download: bool) -> None:
    """Check the archive under ``root`` (fetched first with ``download``) against its MD5 and
    extract it; the batch files are checked again when they are read."""
    archive = os.path.join(root, cls.filename)
    if not os.path.isfile(archive):
        if not download:
            raise _unavailable(cls, name, root, "no archive, and no extracted folder whose files pass their published MD5 checksums")
        from torchvision.datasets.utils import download_url
        try:
            download_url(cls.url, root, filename=cls.filename, md5=cls.tgz_md5)
        except Exception as exc:  # network errors of every kind
            raise _unavailable(cls, name, root, f"download failed: {exc}") from None
    digest = _md5(archive)
    if digest != cls.tgz_md5:
        raise DatasetUnavailable(f"{archive} has MD5 {digest}, expected {cls.tgz_md5}; delete it and retry "
                                 f"with --download, or point --data-root at a good copy")
    with tarfile.open(archive, "r:gz") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(root, filter="data")
        else:  # pragma: no cover - Pythons without the extraction filters
            for member in tar.getmembers():
                if member.name.startswith(("/", "..")) or ".." in member.name.split("/") or not (
                        member.isfile() or member.isdir()):
                    raise DatasetUnavailable(f"unsafe member {member.name!r} in {archive}")
            tar.extractall(root)


def _load_cifar(name: str, root: str, download: bool, split: str) -> Tuple[torch.Tensor, int]:
    cls = _cifar_class(name)
    files = cls.train_list if split == "train" else cls.test_list
    images = _read_cifar(cls, root, files)
    if images is None:
        _extract_archive(cls, name, root, download)
        images = _read_cifar(cls, root, files)
    if images is None:
        raise _unavailable(cls, name, root, f"{cls.base_folder}/ is incomplete or fails its published "
                                            f"MD5 checksums, and so was not read")
    return images, _CIFAR[name][1]


def _read_cifar(cls, root: str, files) -> Optional[torch.Tensor]:
    """The images of the batch files ``files`` ([name, md5] pairs, torchvision's lists) as uint8
    NCHW, or None when one is missing or fails its MD5. Each file is read once and the bytes
    whose MD5 matched are the bytes unpickled, so the file cannot change in between."""
    import pickle

    import numpy as np

    arrays = []
    for filename, md5 in files:
        try:
            data = read_regular(os.path.join(root, cls.base_folder, filename), follow_links=True)
        except OSError:
            return None
        if hashlib.md5(data).hexdigest() != md5:
            return None
        arrays.append(pickle.loads(data, encoding="latin1")["data"])  # published bytes only
    return torch.from_numpy(np.ascontiguousarray(np.vstack(arrays).reshape(-1, 3, 32, 32)))


def _load_digits() -> Tuple[torch.Tensor, int]:
    from sklearn.datasets import load_digits

    images = torch.as_tensor(load_digits().images, dtype=torch.float64)  # (1797, 8, 8) in 0..16
    return (images * (255.0 / 16.0)).round().clamp(0, 255).to(torch.uint8).unsqueeze(1).contiguous(), 10


def load_dataset(name: str, root: str = "./data", download: bool = False,
                 split: str = "train") -> Tuple[torch.Tensor, int]:
    """``(images, num_classes)``: ``images`` uint8 (N, C, H, W). ``split`` is "train" or "test"
    for CIFAR (digits has one split and ignores it)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name == "digits":
        return _load_digits()
    return _load_cifar(name, root, download, split)


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 in [-1, 1]."""
    return images.float() * (2.0 / 255.0) - 1.0


def from_model_range(x: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] (clamped) -> uint8 0..255."""
    return ((x.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)


class BatchIterator:
    """Endless iterator over shuffled batches of ``data`` (any tensor, first dim N).

    Each epoch draws ``randperm(N)`` from ``generator`` and yields ``N // batch_size`` full
    batches; the remainder is dropped, or with ``drop_last=False`` yielded as a last, shorter
    batch (as the paper's code does: 80 images for CIFAR's 50,000 in batches of 128). With ``hflip=True`` each batch then draws a per-sample
    flip mask ``rand(B) < 0.5`` from the same generator and mirrors those images along the
    width. Batches are returned on ``data``'s device, unconverted (``to_model_range`` next).

    ``state_dict()`` holds the position (``epoch``, ``index`` = batches already yielded this
    epoch), the current permutation and the generator's state; ``load_state_dict`` restores all
    of them (including the generator), so a resumed run yields exactly the batches an
    uninterrupted run would.
    """

    def __init__(self, data: torch.Tensor, batch_size: int, generator: torch.Generator,
                 hflip: bool = False, drop_last: bool = True) -> None:
        n = int(data.shape[0])
        if batch_size < 1 or batch_size > n:
            raise ValueError(f"batch_size must be in [1, {n}] for a dataset of {n} items, got {batch_size}")
        self.data, self.batch_size, self.generator, self.hflip = data, int(batch_size), generator, bool(hflip)
        self.batches_per_epoch = n // self.batch_size if drop_last else -(-n // self.batch_size)
        self.epoch = 0
        self.index = 0
        self.perm: Optional[torch.Tensor] = None

    def _new_perm(self) -> None:
        gdev = self.generator.device if self.generator is not None else torch.device("cpu")
        self.perm = torch.randperm(self.data.shape[0], generator=self.generator, device=gdev).cpu()

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> torch.Tensor:
        if self.perm is None:
            self._new_perm()
        elif self.index >= self.batches_per_epoch:
            self.epoch += 1
            self.index = 0
            self._new_perm()
        idx = self.perm[self.index * self.batch_size:(self.index + 1) * self.batch_size]
        self.index += 1
        batch = self.data[idx.to(self.data.device)]
        if self.hflip:
            gdev = self.generator.device if self.generator is not None else torch.device("cpu")
            flip = (torch.rand(batch.shape[0], generator=self.generator, device=gdev) < 0.5).to(batch.device)
            batch = torch.where(flip.reshape(-1, *([1] * (batch.dim() - 1))), batch.flip(-1), batch)
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index,
                "perm": self.perm.clone() if self.perm is not None else torch.empty(0, dtype=torch.long),
                "rng_state": self.generator.get_state().clone(), "batch_size": self.batch_size,
                "num_items": int(self.data.shape[0])}

    def load_state_dict(self, state: dict) -> None:
        if int(state["num_items"]) != int(self.data.shape[0]) or int(state["batch_size"]) != self.batch_size:
            raise ValueError(f"iterator state is for {state['num_items']} items in batches of {state['batch_size']}, "
                             f"this iterator has {self.data.shape[0]} items in batches of {self.batch_size}")
        epoch, index, perm = int(state["epoch"]), int(state["index"]), state["perm"]
        n = int(self.data.shape[0])
        if epoch < 0 or not 0 <= index <= self.batches_per_epoch:
            raise ValueError(f"iterator position epoch {epoch}, batch {index} is outside 0..{self.batches_per_epoch}")
        if (not isinstance(perm, torch.Tensor) or perm.dim() != 1 or perm.dtype.is_floating_point
                or perm.dtype == torch.bool or (perm.numel() and not torch.equal(perm.long().cpu().sort().values,
                                                                                torch.arange(n)))):
            raise ValueError(f"iterator permutation is not a permutation of the {n} items")
        self.epoch, self.index = epoch, index
        self.perm = perm.clone().long().cpu() if perm.numel() else None
        self.generator.set_state(state["rng_state"].cpu().to(torch.uint8))
