"""``natural_images``: every natural photograph that locally installable packages ship, for ImageNet
models on a machine without ImageNet: label-free fidelity (agreement and KL with the FP32 model) on
all of it, top-1 on the part that carries ImageNet labels.

Sources (found with importlib.metadata; none is imported):

- foolbox 3.3.4 (MIT): its 20 ImageNet validation samples (512x512, with torchvision's ImageNet class
  index: the only labelled images), 20 CIFAR-10 and 20 CIFAR-100 test images (32x32, upscaled by the
  model's preprocessing; their CIFAR labels are not ImageNet classes, so they count as unlabelled).
- scikit-image (BSD-3; each image's own licence in its ``skimage.data`` docstring): the 13 camera
  photographs bundled in ``skimage/data`` whose docstring states a licence: astronaut, rocket and
  hubble_deep_field (NASA / SpaceX, public domain), chelsea, coffee, camera, brick, grass, gravel and
  retina (CC0), clock_motion (public domain), coins and ihc (no known copyright restrictions). Left
  out: drawings, renderings and charts (logo, horse, phantom, chessboard, color, text, page), the
  stereo pair (research-use dataset), moon (no licence stated), tiny crops (lfw_subset 25x25,
  microaneurysms 102x102) and cell.
- scikit-learn (BSD-3): ``sklearn/datasets/images`` china.jpg and flower.jpg (Flickr, CC BY 2.0).

A missing package drops its images: the row's ``dataset_info.missing`` says which and how to get
them (never a crash, unless nothing is left). Each image gives ``dataset.views`` views, fixed by
``dataset.view_seed``: view k crops a box of ``scales[k % len(scales)]`` times the image's width and
height (the whole image at scale 1; elsewhere at a position drawn from a generator seeded by the
seed, the image's name and k, so adding a source moves no other image's views), flipped
horizontally when ``(k // len(scales))`` is odd; then the model's own eval preprocessing (resize,
center crop, normalise of ``BuiltModel.preprocess``). View 0 is the plain eval view. Labels are
ImageNet class indices where the source gives one and ``UNLABELLED`` (-1) elsewhere; the evaluation
counts top-k over labelled views only (``dataset_info.n_labelled``), agreement and KL over all.

The cropped, resized uint8 views are built once per (images, views, preprocessing) and cached under
``dataset.cache_dir`` (null: ``$DFQ_BENCH_CACHE`` or ``~/.cache/dfq_bench``) in ``natural_images/``;
a cache that cannot be written is a warning. The set's identity (sources with versions, the images'
sha256, views) is recorded in the row and keys the FP32 eval cache. There is no train split: ``calib``
is None, so ``data=real`` is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from dfq_bench.data import UNLABELLED, DataBundle, DatasetError, check_classes
from dfq_bench.data.imagenet import eval_subset, interpolation, loader, preprocess_info

log = logging.getLogger(__name__)
FORMAT = 1  # bump when the view construction changes: old cache entries are rebuilt

SKIMAGE_PHOTOS = ("astronaut.png", "brick.png", "camera.png", "chelsea.png", "clock_motion.png", "coffee.png",
                  "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "retina.jpg",
                  "rocket.jpg")
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")


@dataclass(frozen=True)
class Image:
    name: str  # "<package>/<file>", unique over the sources
    path: Path
    label: int  # ImageNet class index, or UNLABELLED


def _package_dir(package: str, folder: str) -> tuple[str, Path]:
    dist = distribution(package)  # PackageNotFoundError if absent
    return dist.version, Path(dist.locate_file(folder))


def _foolbox() -> list[Image]:
    version, folder = _package_dir("foolbox", "foolbox/data")
    images = []
    for prefix, labelled in (("imagenet", True), ("cifar10", False), ("cifar100", False)):
        pattern = re.compile(rf"{prefix}_(\d+)_(\d+)\.(?:jpg|png)")
        found = sorted((int(m.group(1)), p, int(m.group(2))) for p in folder.glob(f"{prefix}_*")
                       if (m := pattern.fullmatch(p.name)))
        images += [Image(f"foolbox/{p.name}", p, label if labelled else UNLABELLED) for _, p, label in found]
    return images


def _files(package: str, folder: str, names: tuple[str, ...]) -> list[Image]:
    _, base = _package_dir(package, folder)
    return [Image(f"{package}/{n}", base / n, UNLABELLED) for n in names if (base / n).is_file()]


SOURCES = {  # package: (its images, install hint)
    "foolbox": (_foolbox, "pip install --no-deps foolbox==3.3.4"),
    "scikit-image": (lambda: _files("scikit-image", "skimage/data", SKIMAGE_PHOTOS), "pip install scikit-image"),
    "scikit-learn": (lambda: _files("scikit-learn", "sklearn/datasets/images", SKLEARN_PHOTOS),
                     "pip install scikit-learn"),
}


def found_sources() -> tuple[list[Image], dict, list[str]]:
    """(images, {package: {version, images, labelled}}, notes on the missing ones), in source order."""
    images, sources, missing = [], {}, []
    for package, (find, hint) in SOURCES.items():
        try:
            got = find()
        except (PackageNotFoundError, OSError) as e:
            missing.append(f"{package}: not installed ({type(e).__name__}); {hint} (or pip install -e '.[natural]')")
            continue
        if not got:
            missing.append(f"{package} {distribution(package).version}: none of its images found; {hint}")
            continue
        images += got
        sources[package] = {"version": distribution(package).version, "images": len(got),
                            "labelled": sum(im.label != UNLABELLED for im in got)}
    return images, sources, missing


def source_versions() -> list[str]:
    """``package==version`` of the sources present (cheap: for the run_id, config.identity_config)."""
    out = []
    for package in SOURCES:
        try:
            out.append(f"{package}=={distribution(package).version}")
        except PackageNotFoundError:
            pass
    return out


def view_boxes(width: int, height: int, name: str, views: int, scales, seed: int) -> list[tuple]:
    """(left, top, crop width, crop height, flip) of each view of one image (module docstring)."""
    boxes = []
    for k in range(views):
        s = float(scales[k % len(scales)])
        flip = (k // len(scales)) % 2 == 1
        cw, ch = max(1, round(s * width)), max(1, round(s * height))
        digest = hashlib.sha256(f"{seed}:{name}:{k}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        left = int(torch.randint(0, width - cw + 1, (1,), generator=g)) if cw < width else 0
        top = int(torch.randint(0, height - ch + 1, (1,), generator=g)) if ch < height else 0
        boxes.append((left, top, cw, ch, flip))
    return boxes


def build_views(images: list[Image], views: int, scales, seed: int, pre) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N * views, 3, crop, crop) views after resize and center crop (not yet normalised), labels."""
    from PIL import Image as PILImage
    from torchvision.transforms import functional as TF

    out, labels = [], []
    for im in images:
        with PILImage.open(im.path) as f:
            rgb = f.convert("RGB")
        for left, top, cw, ch, flip in view_boxes(*rgb.size, im.name, views, scales, seed):
            v = rgb.crop((left, top, left + cw, top + ch))
            if flip:
                v = v.transpose(PILImage.Transpose.FLIP_LEFT_RIGHT)
            v = TF.center_crop(TF.resize(v, pre.resize, interpolation=interpolation(pre.interpolation)), pre.crop)
            out.append(TF.pil_to_tensor(v))
            labels.append(im.label)
    return torch.stack(out), torch.tensor(labels, dtype=torch.int64)


def images_sha256(images: list[Image]) -> str:
    h = hashlib.sha256()
    for im in images:
        h.update(im.name.encode() + b"\0" + hashlib.sha256(im.path.read_bytes()).digest())
    return h.hexdigest()


def cached_views(cfg, identity: dict, images: list[Image], pre) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The uint8 views and labels from the cache, or built and stored; and "hit", "miss" or "unwritable"."""
    from dfq_bench.calib.cache import cache_root
    from dfq_bench.results import atomic_write

    key = hashlib.sha256(json.dumps({**identity, "format": FORMAT}, sort_keys=True).encode()).hexdigest()
    path = cache_root(cfg.get("cache_dir")) / "natural_images" / f"{key[:24]}.pt"
    if path.exists():
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            if entry.get("key") == key and entry["views"].dtype == torch.uint8:
                return entry["views"], entry["labels"], "hit"
            raise ValueError("unexpected contents")
        except Exception as e:  # a torn or foreign file: rebuilt
            log.warning("natural_images cache file %s is unreadable (%s); rebuilding it", path, e)
    views, labels = build_views(images, cfg.views, cfg.scales, cfg.view_seed, pre)
    try:
        atomic_write(path, lambda tmp: torch.save({"key": key, "views": views, "labels": labels}, tmp))
    except Exception as e:
        log.warning("cannot write natural_images cache %s (%s: %s); going on without it", path, type(e).__name__, e)
        return views, labels, "unwritable"
    return views, labels, "miss"


def natural_images(cfg, built) -> DataBundle:
    check_classes("natural_images", 1000, built.num_classes)
    images, sources, missing = found_sources()
    if not images:
        raise DatasetError("natural_images found no images: " + "; ".join(missing))
    for note in missing:
        log.warning("natural_images without %s", note)
    pre = built.preprocess
    identity = {"sources": sources, "images_sha256": images_sha256(images), "n_images": len(images),
                "views": cfg.views, "scales": [float(s) for s in cfg.scales], "view_seed": cfg.view_seed,
                "preprocess": preprocess_info(pre)}
    views, labels, cache = cached_views(cfg, identity, images, pre)
    mean = torch.tensor(pre.mean, dtype=torch.float32).reshape(1, -1, 1, 1)
    std = torch.tensor(pre.std, dtype=torch.float32).reshape(1, -1, 1, 1)
    x = (views.float() / 255 - mean) / std  # = ToTensor + Normalize of the PIL view
    subset, n = eval_subset(TensorDataset(x, labels), cfg.limit)
    kept = labels if n == len(labels) else labels[[i * len(labels) // n for i in range(n)]]
    info = {**identity, "missing": missing, "n_total": len(labels), "n_labelled": int((kept != UNLABELLED).sum()),
            "limit": cfg.limit, "subset": "evenly_spaced" if n < len(labels) else "all", "view_cache": cache}
    return DataBundle(loader(subset, cfg), n, 1000, None, info)
