"""Times SQuant's weight quantization on whole torchvision models, next to RTN and to the independent
loop-per-kernel reference (tests/test_squant.py), and measures its peak extra memory.

    python scripts/bench_squant.py [--models resnet18,resnet50,mobilenet_v2] [--bits 4] [--repeats 5]
                                   [--threads 1,2] [--device cpu|cuda]

Weights are random-init (timing does not depend on them). One pass = every Conv/Linear weight
through the per-channel asymmetric grid (``weight_grid``) and ``Squant.round_weights``, as in
``Method.quantize``; each layer's levels are dropped before the next layer, as the pipeline does
when it writes them back into the weight. At each thread count of ``--threads``
(``torch.set_num_threads``), RTN and SQuant passes alternate, one of each per repeat after one
warm-up pair, so that both see the same load on a shared machine; times are medians of
``--repeats`` (wall clock; SQuant's process CPU time too), and /RTN is the median of the
per-repeat ratios SQuant / RTN.

The loop reference is too slow for whole models: it runs on the first output channels of every
layer (about ``--ref-elems`` weights in all; stage C is per output channel, so a channel subset is
an exact sub-problem), its levels are checked against SQuant's on those channels, and its time is
extrapolated linearly in the number of weights (printed as such).

``--device cuda``: the weights live on the GPU and each pass ends with ``torch.cuda.synchronize()``
(the CPU time column is then the host's); the thread count sets the host's threads only. RTN rounds on the
GPU; SQuant's flips run on the CPU whatever the device (methods/squant.py), so its time includes the copies
there and back. The loop reference runs on CPU copies of the same channels; memory is the peak of torch's
CUDA allocator during one pass, less what it held before (``torch.cuda.max_memory_allocated``), in this
process: with the flips on the CPU, that is the grid's tensors and the levels copied back.

Memory (CPU): in a fresh subprocess, after building the model, ``gc`` and ``malloc_trim``, the kernel's
peak-RSS counter is reset (``/proc/self/clear_refs`` = 5); one pass runs; extra = VmHWM - VmRSS
before the pass. This counts everything the pass touches (torch temporaries, allocator slack),
unlike tracemalloc, which does not see torch's allocations.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torchvision
from dfq_bench.methods.squant import Squant
from torch import nn

from dfq_bench.core.grid import weight_grid

REPO = Path(__file__).resolve().parents[1]


def load_reference():
    """The oracle from tests/test_squant.py (written independently of methods/squant.py)."""
    sys.path.insert(0, str(REPO / "tests"))  # the test module imports tests/helpers.py
    spec = importlib.util.spec_from_file_location("squant_oracle", REPO / "tests" / "test_squant.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.reference_levels


def model_weights(name: str, device: str = "cpu") -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    return [m.weight.detach().to(device) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def synced(fn, device: str):
    """``fn`` followed by a CUDA synchronize where the weights are on the GPU (its kernels are asynchronous)."""
    if device == "cpu":
        return fn
    return lambda: (fn(), torch.cuda.synchronize())


def squant_pass(weights, bits: int, method: Squant) -> None:
    for w in weights:
        grid = weight_grid(w, bits, per_channel=True, symmetric=False)
        method.round_weights(w, grid, None)


def rtn_pass(weights, bits: int) -> None:
    for w in weights:
        weight_grid(w, bits, per_channel=True, symmetric=False).levels(w)


def timed_pair(rtn, squant, repeats: int) -> dict:
    """RTN and SQuant alternately, ``repeats`` times after one warm-up pair: median wall seconds of
    each, SQuant's median CPU seconds, and the median of the per-repeat ratios SQuant / RTN."""
    rtn(), squant()
    rows = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        rtn()
        t1, c1 = time.perf_counter(), time.process_time()
        squant()
        rows.append((t1 - t0, time.perf_counter() - t1, time.process_time() - c1))
    rtn_s, sq_s, sq_cpu = (statistics.median(col) for col in zip(*rows, strict=True))
    return {"rtn": rtn_s, "squant": sq_s, "cpu": sq_cpu, "ratio": statistics.median(b / a for a, b, _ in rows)}


def reference_subset(weights, bits: int, budget: int, reference, method: Squant) -> dict:
    """Loop reference on the first channels of every layer; checks agreement, extrapolates time."""
    total = sum(w.numel() for w in weights)
    frac = min(1.0, budget / total)
    elems, seconds, agree = 0, 0.0, True
    for w in weights:
        n = max(1, round(w.shape[0] * frac))
        grid = weight_grid(w, bits, per_channel=True, symmetric=False)
        x = grid.scaled(w)
        fast = method.round_weights(w, grid, None)[:n].cpu()
        t0 = time.perf_counter()
        ref = reference(x[:n].cpu(), grid.qmin, grid.qmax)
        seconds += time.perf_counter() - t0
        agree &= torch.equal(ref, fast)
        elems += x[:n].numel()
    return {"elems": elems, "seconds": seconds, "extrapolated": seconds * total / elems, "agree": agree}


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(name: str, bits: int) -> None:
    """Runs in a subprocess: prints the peak extra RSS of one pass, in bytes, as JSON."""
    weights = model_weights(name)
    method = Squant()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _rss_kb("VmRSS")
    squant_pass(weights, bits, method)
    peak = _rss_kb("VmHWM")
    print(json.dumps({"extra_bytes": (peak - before) * 1024}))


def cuda_memory(weights, bits: int, method: Squant) -> int:
    """Peak bytes torch's CUDA allocator holds during one pass beyond what it held before."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    squant_pass(weights, bits, method)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def measure_memory(name: str, bits: int) -> int:
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", name, "--bits", str(bits)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_bytes"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,resnet50,mobilenet_v2")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    ap.add_argument("--device", default="cpu", help="cpu or cuda: where the weights and the passes run")
    ap.add_argument("--ref-elems", type=int, default=150_000, help="weights the loop reference runs on")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.bits)
        return
    if args.device != "cpu" and not (args.device.startswith("cuda") and torch.cuda.is_available()):
        sys.exit(f"--device {args.device}: valid: cpu, or cuda where torch sees a GPU "
                 f"(torch.cuda.is_available() is {torch.cuda.is_available()})")
    reference = load_reference()
    threads = [int(t) for t in args.threads.split(",")]
    where = "CPU" if args.device == "cpu" else f"{torch.cuda.get_device_name(args.device)} ({args.device})"
    print(f"{where}, torch {torch.__version__}, threads {args.threads}, W{args.bits} per-channel asymmetric, "
          f"RTN and SQuant alternating, median of {args.repeats} after a warm-up; "
          f"load average at start {os.getloadavg()[0]:.1f}")
    header = f"{'model':13s}{'weights':>9s}{'thr':>4s}{'RTN s':>8s}{'SQuant s':>10s}{'cpu s':>8s}{'/RTN':>6s}"
    print(header + f"{'loop ref s*':>12s}{'ref/SQ':>8s}{'agree':>7s}{'extra MB':>10s}{'/weights':>10s}")
    default_threads = torch.get_num_threads()
    for name in args.models.split(","):
        weights = model_weights(name, args.device)
        size = sum(w.numel() * w.element_size() for w in weights)
        method = Squant()
        ref = reference_subset(weights, args.bits, args.ref_elems, reference, method)
        extra = measure_memory(name, args.bits) if args.device == "cpu" else cuda_memory(weights, args.bits, method)
        for n_threads in threads:
            torch.set_num_threads(n_threads)
            t = timed_pair(synced(lambda w=weights: rtn_pass(w, args.bits), args.device),
                           synced(lambda w=weights, m=method: squant_pass(w, args.bits, m), args.device), args.repeats)
            line = (f"{name:13s}{size / 2**20:>7.1f}MB{n_threads:>4d}{t['rtn']:>8.3f}{t['squant']:>10.3f}"
                    f"{t['cpu']:>8.3f}{t['ratio']:>6.2f}{ref['extrapolated']:>12.1f}"
                    f"{ref['extrapolated'] / t['squant']:>8.0f}")
            if n_threads == threads[0]:
                line += f"{'yes' if ref['agree'] else 'NO':>7s}{extra / 2**20:>10.1f}{extra / size:>10.2f}"
            print(line)
        torch.set_num_threads(default_threads)
        print(f"{'':13s}* loop reference timed on {ref['elems']} of "
              f"{sum(w.numel() for w in weights)} weights ({ref['seconds']:.1f} s), extrapolated")
    print(f"load average at end {os.getloadavg()[0]:.1f} (other jobs share these cores)")


if __name__ == "__main__":
    main()
