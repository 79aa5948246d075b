"""Real image datasets: ``imagenet`` (an ImageFolder tree), ``cifar10`` and ``cifar100`` (torchvision).

``imagenet``: ``dataset.root`` is either an ImageNet folder with ``val/<class>/*`` (and optionally
``train/<class>/*``), or itself a folder of class sub-folders (a custom evaluation set; it has no
train split). Class indices follow the sorted folder names, as in torchvision's ImageFolder: with
the usual WordNet-id folders (n01440764, ...) that is the index order of torchvision's and timm's
ImageNet weights. Images get the model's eval preprocessing (``BuiltModel.preprocess``). ImageNet
cannot be downloaded automatically (it needs a licence from image-net.org); the validation images
must be sorted into class folders first.

``cifar10``/``cifar100``: torchvision's datasets under ``dataset.root`` (downloaded there if they
are missing and the network allows it), test split for evaluation, train split for calibration.
Preprocessing is the dataset's own mean/std and no resize (CIFAR models take 32x32 input); a model
whose input is not 32x32 gets the images resized bilinearly to its input size, recorded in the row.

``dataset.limit=N`` evaluates N images evenly spaced over the split (folders are sorted by class,
so the first N would cover only a few classes); ``calib(n, seed)`` draws a seeded random subset of
the train split, never of the evaluation split. Both are recorded in ``bundle.info``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from dfq_bench.data import DataBundle, DatasetError, check_classes, limited
from dfq_bench.models import BuiltModel, Preprocess

CIFAR_STATS = {  # per-channel mean and std of the train split
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
CIFAR_ARCHIVES = {
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-batches-py"),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "cifar-100-python"),
}


def interpolation(name: str):
    from torchvision.transforms import InterpolationMode

    try:
        return InterpolationMode(name)
    except ValueError:
        valid = ", ".join(m.value for m in InterpolationMode)
        raise DatasetError(f"preprocess interpolation {name!r} is invalid; valid: {valid}") from None


def eval_transform(p: Preprocess):
    """Resize the short side, center-crop, to tensor, normalise: the model's eval preprocessing."""
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(p.resize, interpolation=interpolation(p.interpolation)),
        T.CenterCrop(p.crop),
        T.ToTensor(),
        T.Normalize(p.mean, p.std),
    ])


def preprocess_info(p: Preprocess) -> dict:
    return {"resize": p.resize, "crop": p.crop, "mean": list(p.mean), "std": list(p.std),
            "interpolation": p.interpolation}


def eval_subset(ds: Dataset, limit: int | None) -> tuple[Dataset, int]:
    """The whole split, or ``limit`` items evenly spaced over it (deterministic)."""
    n_total = len(ds)
    n = limited(n_total, limit)
    if n == n_total:
        return ds, n
    return Subset(ds, [i * n_total // n for i in range(n)]), n


def seeded_calib(make_train: Callable[[], Dataset]) -> Callable[[int, int], Tensor]:
    """``calib(n, seed)``: n images drawn at random (seeded) from the train split, built lazily."""
    cache: list[Dataset] = []

    def calib(n: int, seed: int) -> Tensor:
        if not cache:
            cache.append(make_train())
        ds = cache[0]
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
        return torch.stack([ds[int(i)][0] for i in idx])

    return calib


def loader(ds: Dataset, cfg) -> DataLoader:
    return DataLoader(ds, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers)


# ---------------------------------------------------------------------------------------------
# ImageNet (any ImageFolder tree)

IMAGENET_HINT = (
    "point dataset.root at a folder holding val/<class>/<images> (and optionally train/), or at a "
    "folder of class sub-folders; ImageNet (ILSVRC2012) comes from image-net.org after registration "
    "and its val images must be sorted into class folders"
)


def open_rgb(path: str):
    """ImageFolder's loader: the image as RGB; an unreadable or truncated file names itself."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:  # PIL: truncated, not an image, bad header
        raise DatasetError(f"cannot read image {path}: {type(e).__name__}: {e}") from None


def image_folder(path: Path, transform, what: str):
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(str(path), transform=transform, loader=open_rgb)
    except FileNotFoundError as e:  # no class folders, or a class folder without images
        msg = str(e).strip().splitlines()[0] if str(e).strip() else "no images"
        raise DatasetError(f"{what} {path} has no usable images ({msg}); {IMAGENET_HINT}") from None


def imagenet_dirs(root: str | None) -> tuple[Path, Path | None]:
    """(evaluation folder, train folder or None) for ``dataset.root``."""
    if root is None:
        raise DatasetError(f"dataset.root is not set for dataset=imagenet; {IMAGENET_HINT}")
    base = Path(str(root)).expanduser()
    if not base.is_dir():
        raise DatasetError(f"dataset.root={str(root)!r} does not exist or is not a folder; {IMAGENET_HINT}")
    if (base / "val").is_dir():
        train = base / "train"
        return base / "val", train if train.is_dir() else None
    return base, None


def imagenet(cfg, built: BuiltModel) -> DataBundle:
    eval_dir, train_dir = imagenet_dirs(cfg.root)
    transform = eval_transform(built.preprocess)
    ds = image_folder(eval_dir, transform, "evaluation folder")
    check_classes("imagenet", len(ds.classes), built.num_classes)
    subset, n = eval_subset(ds, cfg.limit)

    calib = None
    if train_dir is not None:
        def make_train():
            train = image_folder(train_dir, transform, "train folder")
            if train.classes != ds.classes:
                raise DatasetError(
                    f"train folder {train_dir} has {len(train.classes)} classes that differ from "
                    f"the {len(ds.classes)} of {eval_dir}; both splits need the same class folders"
                )
            return train

        calib = seeded_calib(make_train)
    info = {
        "root": str(eval_dir), "train_root": None if train_dir is None else str(train_dir),
        "n_total": len(ds), "limit": cfg.limit, "subset": "evenly_spaced" if n < len(ds) else "all",
        "preprocess": preprocess_info(built.preprocess),
    }
    return DataBundle(loader(subset, cfg), n, len(ds.classes), calib, info)


# ---------------------------------------------------------------------------------------------
# CIFAR


def cifar_transform(name: str, built: BuiltModel):
    """Tensor + the dataset's mean/std; resized to the model's input if it is not 32x32."""
    from torchvision import transforms as T

    size = tuple(built.input_size[1:])
    steps = [T.ToTensor()]
    if size != (32, 32):
        steps.append(T.Resize(size, interpolation=interpolation("bilinear"), antialias=True))
    mean, std = CIFAR_STATS[name]
    steps.append(T.Normalize(mean, std))
    info = {"mean": list(mean), "std": list(std), "resize": None if size == (32, 32) else list(size)}
    return T.Compose(steps), info


def cifar_split(name: str, root: Path, train: bool, transform):
    """torchvision's CIFAR split; downloads it once if missing and the network allows."""
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        return cls(str(root), train=train, transform=transform, download=False)
    except RuntimeError:  # "Dataset not found or corrupted"
        pass
    try:
        return cls(str(root), train=train, transform=transform, download=True)
    except Exception as e:
        url, folder = CIFAR_ARCHIVES[name]
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DatasetError(
            f"{name} not found under dataset.root={str(root)!r} and the download failed "
            f"({type(e).__name__}: {first}); download {url} and extract it there (giving "
            f"{root / folder}), or set dataset.root to where it is"
        ) from None


def cifar(name: str, cfg, built: BuiltModel) -> DataBundle:
    classes = 10 if name == "cifar10" else 100
    check_classes(name, classes, built.num_classes)
    root = Path(str(cfg.root or "~/.cache/dfq_bench/data")).expanduser()
    transform, pre_info = cifar_transform(name, built)
    ds = cifar_split(name, root, False, transform)
    subset, n = eval_subset(ds, cfg.limit)
    calib = seeded_calib(lambda: cifar_split(name, root, True, transform))
    info = {"root": str(root), "n_total": len(ds), "limit": cfg.limit,
            "subset": "evenly_spaced" if n < len(ds) else "all", "preprocess": pre_info}
    return DataBundle(loader(subset, cfg), n, classes, calib, info)


def cifar10(cfg, built: BuiltModel) -> DataBundle:
    return cifar("cifar10", cfg, built)


def cifar100(cfg, built: BuiltModel) -> DataBundle:
    return cifar("cifar100", cfg, built)
