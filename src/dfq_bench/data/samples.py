"""``imagenet_samples`` and ``cifar10_samples``: the 20 labelled real images per dataset that
foolbox 3.3.4 (MIT licence) ships in its ``data/`` folder, for a real-image smoke test of
ImageNet/CIFAR models on a machine without the datasets.

The files are ``<dataset>_<index>_<label>.<ext>`` (``imagenet_00_243.jpg``: 512x512 RGB JPEGs with
torchvision's ImageNet class index; ``cifar10_00_3.png``: 32x32 RGB PNGs). foolbox is only used as
a container of files: it is found with importlib.metadata and never imported (its own
dependencies need not be installed): ``pip install --no-deps foolbox==3.3.4``, or the ``samples``
extra. ``dataset.root`` may instead point at any folder holding files with these names.

ImageNet samples get the model's eval preprocessing (resize / center-crop / mean-std of
``BuiltModel.preprocess``); CIFAR-10 samples get the same transform as ``dataset=cifar10``.
20 images measure little: the row's ``n_eval`` says so. There is no train split: ``calib`` is
None, so ``data=real`` is refused for these datasets.
"""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from dfq_bench.data import DataBundle, DatasetError, check_classes
from dfq_bench.data.imagenet import (
    cifar_transform,
    eval_subset,
    eval_transform,
    loader,
    preprocess_info,
)
from dfq_bench.models import BuiltModel

FOOLBOX_HINT = "pip install --no-deps foolbox==3.3.4 (or pip install -e '.[samples]')"


def foolbox_data_dir() -> Path:
    """The ``foolbox/data`` folder of the installed distribution, without importing foolbox."""
    try:
        dist = distribution("foolbox")
    except PackageNotFoundError:
        raise DatasetError(f"the sample images come with foolbox, which is not installed: {FOOLBOX_HINT}") from None
    folder = Path(dist.locate_file("foolbox/data"))
    if not folder.is_dir():
        raise DatasetError(f"foolbox {dist.version} has no data folder at {folder}; {FOOLBOX_HINT}")
    return folder


def sample_files(prefix: str, root: str | None) -> list[tuple[Path, int]]:
    """(path, label) of ``<prefix>_<index>_<label>.*`` files, in index order."""
    folder = Path(str(root)).expanduser() if root is not None else foolbox_data_dir()
    pattern = re.compile(rf"{re.escape(prefix)}_(\d+)_(\d+)\.(?:jpg|jpeg|png)", re.IGNORECASE)
    found = []
    for path in folder.glob(f"{prefix}_*") if folder.is_dir() else []:
        m = pattern.fullmatch(path.name)
        if m:
            found.append((int(m.group(1)), path, int(m.group(2))))
    if not found:
        raise DatasetError(
            f"no {prefix}_<index>_<label> images in {folder}; {FOOLBOX_HINT}, or point dataset.root "
            "at a folder of such files"
        )
    return [(path, label) for _, path, label in sorted(found)]


def samples_bundle(name: str, prefix: str, classes: int, transform, pre_info, cfg, built) -> DataBundle:
    from PIL import Image

    check_classes(name, classes, built.num_classes)
    files = sample_files(prefix, cfg.root)
    images = torch.stack([transform(Image.open(p).convert("RGB")) for p, _ in files])
    labels = torch.tensor([label for _, label in files])
    if int(labels.max()) >= classes:
        raise DatasetError(f"{name}: label {int(labels.max())} in {files[0][0].parent} exceeds {classes} classes")
    subset, n = eval_subset(TensorDataset(images, labels), cfg.limit)
    info = {"root": str(files[0][0].parent), "n_total": len(files), "limit": cfg.limit,
            "subset": "evenly_spaced" if n < len(files) else "all", "preprocess": pre_info}
    return DataBundle(loader(subset, cfg), n, classes, None, info)


def imagenet_samples(cfg, built: BuiltModel) -> DataBundle:
    pre = built.preprocess
    return samples_bundle("imagenet_samples", "imagenet", 1000, eval_transform(pre),
                          preprocess_info(pre), cfg, built)


def cifar10_samples(cfg, built: BuiltModel) -> DataBundle:
    transform, pre_info = cifar_transform("cifar10", built)
    return samples_bundle("cifar10_samples", "cifar10", 10, transform, pre_info, cfg, built)
