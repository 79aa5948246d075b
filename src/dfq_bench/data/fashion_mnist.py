"""``fashion_mnist``: the full Fashion-MNIST (Xiao et al. 2017; 60k train / 10k test, 1x28x28, 10
classes), read straight from its idx files.

Where the files are looked for, in order (each folder may hold the four files plain or as ``.gz``,
directly or under torchvision's ``FashionMNIST/raw/``):

1. ``dataset.root``;
2. ``/usr/share/datasets/fashion-mnist`` (Debian/Ubuntu package ``dataset-fashion-mnist``);
3. torchvision's ``FashionMNIST(root, download=True)`` into ``dataset.root``, where the network
   allows.

Missing everywhere: a one-line ``DatasetError`` saying how to get them. A split is parsed once per
process into one uint8 tensor (the 60k train images take well under a second to decompress).

Evaluation uses the 10k test split (``dataset.limit=N``: N images evenly spaced over it). Images are
scaled to [0, 1] and normalised with the model's ``preprocess.mean``/``std``; the model must take
1x28x28 input and output 10 classes. ``calib(n, seed)`` returns n images drawn at random (seeded)
from the *train* split, preprocessed the same way, for the real-data control ``data=real``.
"""

from __future__ import annotations

import functools
import gzip
import logging
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dfq_bench.data import DataBundle, DatasetError, check_classes, limited
from dfq_bench.models import BuiltModel

log = logging.getLogger(__name__)

SYSTEM_DIRS = (Path("/usr/share/datasets/fashion-mnist"),)
DEFAULT_ROOT = "~/.cache/dfq_bench/data"
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
SIZES = {"train": 60000, "test": 10000}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot")
IMAGE_SIZE = (1, 28, 28)
HINT = ("install it with `apt-get install dataset-fashion-mnist` (files in /usr/share/datasets/fashion-mnist), "
        "or set dataset.root to a folder holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz")


def _file(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def complete_dir(folder: Path) -> Path | None:
    """``folder`` (or its torchvision ``FashionMNIST/raw``) if it holds all four files."""
    for candidate in (folder, folder / "FashionMNIST" / "raw"):
        if all(_file(candidate, stem) for stems in FILES.values() for stem in stems):
            return candidate
    return None


def download(root: Path) -> None:
    """torchvision's download into ``root/FashionMNIST/raw`` (needs network access)."""
    from torchvision.datasets import FashionMNIST

    for train in (True, False):
        FashionMNIST(str(root), train=train, download=True)


def locate(root: str | None) -> tuple[Path, str]:
    """(folder with the four files, where it came from: root | system | download)."""
    base = Path(str(root or DEFAULT_ROOT)).expanduser()
    if (found := complete_dir(base)) is not None:
        return found, "root"
    for folder in SYSTEM_DIRS:
        if (found := complete_dir(folder)) is not None:
            return found, "system"
    try:
        download(base)
    except Exception as e:
        text = str(e).strip().splitlines()
        why = f"{type(e).__name__}: {text[0] if text else ''}"
        raise DatasetError(
            f"Fashion-MNIST not found in dataset.root={str(base)!r} or {SYSTEM_DIRS[0]}, and the download "
            f"failed ({why}); {HINT}"
        ) from None
    if (found := complete_dir(base)) is None:
        raise DatasetError(f"Fashion-MNIST download into {base} left incomplete files; {HINT}")
    return found, "download"


def read_idx(path: Path) -> np.ndarray:
    """An idx file (plain or gzip) of unsigned bytes as an array of its stated shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DatasetError(f"cannot read {path}: {type(e).__name__}: {e}; {HINT}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DatasetError(f"{path} is not an idx file of unsigned bytes; {HINT}")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(dims)):
        raise DatasetError(f"{path} holds {len(data) - offset} bytes of data, its header says {dims}; "
                           f"truncated file? {HINT}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


@functools.lru_cache(maxsize=4)
def load_split(folder: str, split: str) -> tuple[Tensor, Tensor]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) of one split, parsed once per process."""
    image_stem, label_stem = FILES[split]
    images = read_idx(_file(Path(folder), image_stem))
    labels = read_idx(_file(Path(folder), label_stem))
    if images.shape != (SIZES[split], *IMAGE_SIZE[1:]) or labels.shape != (SIZES[split],):
        raise DatasetError(f"Fashion-MNIST {split} split in {folder} has images {images.shape} and labels "
                           f"{labels.shape}; expected ({SIZES[split]}, 28, 28) and ({SIZES[split]},); {HINT}")
    if labels.size and int(labels.max()) >= len(CLASSES):
        bad = int(np.argmax(labels >= len(CLASSES)))
        raise DatasetError(f"{_file(Path(folder), label_stem)} holds label {int(labels[bad])} at index {bad}; "
                           f"valid: 0..{len(CLASSES) - 1} (a corrupt labels file?) {HINT}")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def normalize(images: Tensor, mean, std) -> Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28): [0, 1], then (x - mean) / std (like ToTensor + Normalize)."""
    x = images.unsqueeze(1).to(torch.float32).div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
    return x.sub_(m).div_(s)


class TensorBatches:
    """Consecutive batches of in-memory tensors (no per-item collation)."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int):
        self.x, self.y, self.batch_size = x, y, int(batch_size)

    def __len__(self) -> int:
        return -(-len(self.y) // self.batch_size)

    def __iter__(self):
        for i in range(0, len(self.y), self.batch_size):
            yield self.x[i:i + self.batch_size], self.y[i:i + self.batch_size]


def fashion_mnist(cfg, built: BuiltModel) -> DataBundle:
    check_classes("fashion_mnist", len(CLASSES), built.num_classes)
    if tuple(built.input_size) != IMAGE_SIZE:
        raise DatasetError(f"fashion_mnist images are 1x28x28 but the model takes "
                           f"{'x'.join(map(str, built.input_size))}; pick a model trained on Fashion-MNIST")
    if cfg.batch_size <= 0:
        raise DatasetError(f"dataset.batch_size={cfg.batch_size} is invalid; valid: a positive integer")
    mean, std = tuple(built.preprocess.mean), tuple(built.preprocess.std)
    if len(mean) != 1 or len(std) != 1:
        raise DatasetError(f"the model's preprocess mean {mean} / std {std} are not single-channel; "
                           "fashion_mnist is grayscale")
    folder, source = locate(cfg.root)
    images, labels = load_split(str(folder), "test")
    n_total = len(labels)
    n = limited(n_total, cfg.limit)
    if n < n_total:
        idx = torch.tensor([i * n_total // n for i in range(n)])
        images, labels = images[idx], labels[idx]
    x = normalize(images, mean, std)

    def calib(k: int, seed: int) -> Tensor:
        train_images, _ = load_split(str(folder), "train")
        idx = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(seed))[:k]
        return normalize(train_images[idx], mean, std)

    info = {"root": str(folder), "source": source, "split": "test", "n_total": n_total, "limit": cfg.limit,
            "subset": "evenly_spaced" if n < n_total else "all", "calib_split": "train",
            "preprocess": {"mean": list(mean), "std": list(std)}}
    log.info("fashion_mnist: %d test images from %s", n, folder)
    return DataBundle(TensorBatches(x, labels, cfg.batch_size), n, len(CLASSES), calib, info)
