"""Trains the embedded Fashion-MNIST zoo (resnet20_fmnist, mobilenetv2_fmnist, vgg_fmnist) on CPU and
writes ``src/dfq_bench/models/weights/<name>.pt`` (float32 state dict) and its entry in ``zoo.json``.

Recipe (the same for the three models; everything seeded, so a rerun with the same torch build and
thread count gives the same weights):

- data: the 60k Fashion-MNIST train images (dfq_bench.data.fashion_mnist), scaled to [0, 1] and
  normalised with the model's mean/std (0.2860, 0.3530); the 10k test images are used only once,
  after training, to measure the FP32 top-1 recorded in zoo.json (no model selection on them).
- augmentation: random crop 28x28 from the image zero-padded by 2 pixels, random horizontal flip.
- optimiser: SGD, momentum 0.9 (Nesterov), weight decay 5e-4 on every parameter, batch 128 (the
  last partial batch is dropped), cross-entropy without label smoothing.
- schedule: one-cycle, ``--epochs`` epochs (default 8): learning rate from 0.008 up to 0.2 over
  the first 25% of the steps, then cosine down to 8e-7, momentum cycled 0.95 -> 0.85 -> 0.95
  (torch's OneCycleLR defaults otherwise).
- seed 0 for the initialisation, the data order and the augmentation; ``--threads`` torch
  threads for training (default 1: on these shared 2-core machines one thread per process is
  faster than two contended ones). The final FP32 evaluation runs through the harness's own model
  factory and dataset (checksums verified, batch size of conf/dataset/fashion_mnist.yaml) with
  torch's default thread count, as ``python -m dfq_bench`` does.

Usage::

    python scripts/train_zoo.py --model all            # or one name; --epochs, --threads, --seed
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from dfq_bench.config import CONF_DIR
from dfq_bench.data.fashion_mnist import fashion_mnist, load_split, locate, normalize
from dfq_bench.models import fmnist
from dfq_bench.models.torchvision_timm import sha256_file

log = logging.getLogger("train_zoo")

RECIPE = {
    "data": "fashion_mnist train split (60k), [0,1] then (x - 0.2860) / 0.3530",
    "augmentation": "random crop 28 from zero-padded 32 (pad 2), random horizontal flip p=0.5",
    "optimizer": "SGD momentum 0.9 nesterov, weight decay 5e-4 (all parameters)",
    "batch_size": 128,
    "schedule": "OneCycleLR max_lr 0.2, pct_start 0.25, cosine, div_factor 25, final_div_factor 1e4, "
                "momentum cycled 0.95 -> 0.85 -> 0.95 (OneCycleLR defaults)",
    "loss": "cross-entropy",
}


def augment(x: torch.Tensor, pad_value: float, g: torch.Generator) -> torch.Tensor:
    """Random 28x28 crops of the 2-pixel padded batch and random horizontal flips (seeded)."""
    n = len(x)
    padded = F.pad(x, (2, 2, 2, 2), value=pad_value)
    dx, dy = torch.randint(0, 5, (n,), generator=g), torch.randint(0, 5, (n,), generator=g)
    out = torch.stack([padded[i, :, dy[i]:dy[i] + 28, dx[i]:dx[i] + 28] for i in range(n)])
    flip = torch.rand(n, generator=g) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def train(name: str, epochs: int, seed: int, threads: int) -> tuple[dict, float]:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = fmnist.make(name)
    folder, _ = locate(None)
    images, labels = load_split(str(folder), "train")
    x_all = normalize(images, fmnist.FMNIST_MEAN, fmnist.FMNIST_STD)
    pad_value = -fmnist.FMNIST_MEAN[0] / fmnist.FMNIST_STD[0]  # a black pixel after normalisation
    bs = RECIPE["batch_size"]
    steps = len(labels) // bs
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=epochs * steps, pct_start=0.25)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(labels), generator=g)
        loss_sum = correct = seen = 0
        for s in range(steps):
            idx = order[s * bs:(s + 1) * bs]
            xb, yb = augment(x_all[idx], pad_value, g), labels[idx]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(yb)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(yb)
        log.info("%s epoch %d/%d  train loss %.4f  train acc %.2f%%  %.0fs", name, epoch + 1, epochs,
                 loss_sum / seen, 100.0 * correct / seen, time.perf_counter() - t0)
    wall = time.perf_counter() - t0
    sd = {k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
          for k, v in model.eval().state_dict().items()}
    return sd, wall


@contextlib.contextmanager
def manifest_lock(weights_dir: Path):
    """Several training processes may finish at once; zoo.json is read-modified-written under a lock."""
    with open(weights_dir / ".zoo.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; the package data must be world-readable
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@torch.inference_mode()
def harness_top1(name: str) -> tuple[float, int]:
    """FP32 top-1 (%) on the 10k test split through the harness's factory and dataset."""
    torch.set_num_threads(os.cpu_count() or 1)
    model_cfg = OmegaConf.create({"name": name, "source": "zoo", "weights": "zoo", "sha256": None})
    built = getattr(fmnist, name)(model_cfg)
    ds_cfg = OmegaConf.merge({"num_workers": 0}, OmegaConf.load(CONF_DIR / "dataset" / "fashion_mnist.yaml"))
    bundle = fashion_mnist(ds_cfg, built)
    correct = n = 0
    for xb, yb in bundle.loader:
        logits = built.model(xb)
        correct += int((logits.topk(min(5, logits.shape[1]), 1).indices[:, 0] == yb).sum())
        n += len(yb)
    return 100.0 * correct / n, n


def save(name: str, sd: dict, wall: float, epochs: int, seed: int, threads: int) -> dict:
    weights_dir = fmnist.WEIGHTS_DIR
    weights_dir.mkdir(parents=True, exist_ok=True)
    path = weights_dir / f"{name}.pt"
    with manifest_lock(weights_dir):
        atomic_write(path, lambda tmp: torch.save(sd, tmp))
        manifest = fmnist.read_manifest(weights_dir)
        entry = {
            "file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size,
            "params": sum(v.numel() for k, v in sd.items() if not k.endswith(("running_mean", "running_var",
                                                                              "num_batches_tracked"))),
            "top1_fp32": None, "n_eval": None,
            "recipe": {**RECIPE, "epochs": epochs, "seed": seed, "train_threads": threads},
            "torch": torch.__version__, "train_time_s": round(wall, 1),
            "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        manifest.setdefault("models", {})[name] = entry
        write_manifest(weights_dir, manifest)
    top1, n = harness_top1(name)
    with manifest_lock(weights_dir):
        manifest = fmnist.read_manifest(weights_dir)
        manifest["models"][name].update(top1_fp32=top1, n_eval=n)
        write_manifest(weights_dir, manifest)
    return manifest["models"][name]


def write_manifest(weights_dir: Path, manifest: dict) -> None:
    manifest["models"] = dict(sorted(manifest["models"].items()))
    text = json.dumps(manifest, indent=2) + "\n"
    atomic_write(weights_dir / fmnist.MANIFEST, lambda tmp: Path(tmp).write_text(text))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="all", help=f"one of {', '.join(fmnist.ARCHS)}, or all")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if args.model != "all" and args.model not in fmnist.ARCHS:
        p.error(f"--model {args.model!r} is invalid; valid: {', '.join(fmnist.ARCHS)}, all")
    if args.epochs <= 0 or args.threads <= 0:
        p.error("--epochs and --threads must be positive integers")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    names = list(fmnist.ARCHS) if args.model == "all" else [args.model]
    for name in names:
        sd, wall = train(name, args.epochs, args.seed, args.threads)
        entry = save(name, sd, wall, args.epochs, args.seed, args.threads)
        log.info("%s: top-1 %.2f%% on %d test images, %d params, %d bytes, trained in %.0fs, sha256 %s",
                 name, entry["top1_fp32"], entry["n_eval"], entry["params"], entry["bytes"],
                 entry["train_time_s"], entry["sha256"])


if __name__ == "__main__":
    main()
