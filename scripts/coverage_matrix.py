"""Coverage of torchvision and timm classifiers: for each architecture (random init, BN statistics
re-estimated on 32 normalized pixel-noise images) and each method, either

  (a) a float-equivalent run (every layer at 16 bits, no activation quantization) that preserves the
      function (agreement 100%, KL < 1e-6; DFQ's ReLU6 -> ReLU is the documented exception) and a W8A8
      run (common protocol, normalized pixel-noise calibration; zeroq and genie on their own tiny
      synthetic sets) that agrees with FP32 on >= 90% of the inputs, or
  (b) a one-line refusal before any work (``UnsupportedError``).

Inputs: 64 normalized pixel-noise images (``dataset=fake dataset.images=pixel``: uniform [0, 1) pixels,
then each model's own mean/std), an independent draw from the BN re-estimation and calibration sets.
A random-init model has no meaningful behaviour on real photographs (its BN statistics fit what they
were estimated on; re-estimated on photographs, its top-1 over 1000 random classes is decided by
margins below 8-bit noise), so the check is run where the model is calibrated. GENIE's 16-bit row runs
with ``method.steps=0`` on the noise batch: its reconstruction is an optimisation, not a float-equivalent step (with the
reference's absolute Adam rates, 1e-4 on step sizes of ~1e-5 at 16 bits, it diverges).

Each architecture runs in a subprocess: one Python process composes every cell with Hydra's compose
API and runs it with ``dfq_bench.run.runner.run``, which is what ``python -m dfq_bench <the cell's
overrides>`` runs (the matrix lists that command). Its cells go to ``<out>/cells/<arch>.json``, so the
sweep resumes; then ``<out>/../coverage.md`` gets the matrix. Each architecture also gets the W8A8
agreement of an independent quantizer written here with torch's own ops (``reference_w8a8``): on a
random-init model that is what a plain, correct W8A8 quantizer reaches. GENIE's W8A8 row calibrates
on the noise batch too (GENIE-D data is made by the same BN-statistics hooks as ZeroQ's, which run).

Usage::

    python scripts/coverage_matrix.py [--out results/coverage] [--archs timm:efficientnet_b0 ...] [--table-only]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARCHS = [
    "torchvision:resnet18", "torchvision:mobilenet_v2", "torchvision:inception_v3",
    "torchvision:regnet_y_400mf", "torchvision:shufflenet_v2_x0_5",
    "timm:efficientnet_b0", "timm:mobilenetv3_small_050", "timm:efficientnet_lite0", "timm:mnasnet_050",
    "timm:rexnet_100", "timm:regnetx_002", "timm:ghostnet_100", "timm:densenet121",
    "timm:vit_tiny_patch16_224", "timm:deit_tiny_patch16_224", "timm:swin_tiny_patch4_window7_224",
    "timm:convnext_atto", "timm:repvgg_a0", "timm:levit_128s", "timm:mobilevit_xxs",
]
METHODS = ["rtn", "squant", "dfq", "zeroq", "genie"]
COMMON = ["dataset=fake", "dataset.images=pixel", "dataset.num_samples=64", "model.weights=null",
          "model.bn_reestimate=32", "seed=0"]
SETTINGS = {
    "fe": ["wbits=16", "abits=null", "protocol.first_wbits=null", "protocol.last_wbits=null"],
    "w8a8": ["wbits=8", "abits=8"],
}
TINY_DATA = {  # the methods' own synthetic data, sized for a coverage check (not for accuracy)
    "zeroq": ["data=zeroq_cpu", "data.num_samples=8", "data.batch_size=8", "data.steps=10", "data.cache=false"],
}
GENIE_M = ["method=genie_cpu", "method.batch_size=8", "method.init_samples=8"]
GENIE_STEPS = {"fe": 0, "w8a8": 10}  # reconstruction is an optimisation, not a float-equivalent step
FE_AGREE, FE_KL, W8_AGREE = 100.0, 1e-6, 90.0


def cell_overrides(arch: str, method: str, setting: str) -> list[str]:
    source, name = arch.split(":")
    over = [f"model={source}", f"model.name={name}", *COMMON, *SETTINGS[setting]]
    over += GENIE_M + [f"method.steps={GENIE_STEPS[setting]}"] if method == "genie" else [f"method={method}"]
    noise = ["data=noise", "data.space=pixel", "data.num_samples=32", "data.batch_size=32"]
    if setting == "w8a8":
        over += TINY_DATA.get(method, noise)
    elif method == "genie":  # genie-m needs batches even weight-only; any will do for the 16-bit check
        over += noise
    return over


def reference_w8a8(model, calib, x_eval):
    """An independent W8A8 fake-quantizer written here with torch's own ops only (no dfq_bench
    quantization code): per-channel asymmetric 8-bit weights, BN left unfolded, per-tensor asymmetric
    8-bit activations at every Conv/Linear input but the first (min/max over ``calib``). Returns the
    logits on ``x_eval``: what a plain, known-correct W8A8 quantizer agrees with FP32 on this model."""
    import copy

    import torch
    from torch import nn

    q = copy.deepcopy(model).eval()
    layers = [(n, m) for n, m in q.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
    ranges: dict = {}

    def observe(name):
        def hook(mod, args):
            lo, hi = ranges.get(name, (0.0, 0.0))
            ranges[name] = (min(lo, float(args[0].min())), max(hi, float(args[0].max())))
        return hook

    handles = [m.register_forward_pre_hook(observe(n)) for n, m in layers]
    with torch.no_grad():
        q(calib)
    for h in handles:
        h.remove()
    first = next(iter(ranges))  # dict order = call order

    def fake_input(lo, hi):
        s = max((hi - lo) / 255.0, 1e-12)
        z = int(min(max(round(-lo / s), 0), 255))
        return lambda mod, args: (torch.fake_quantize_per_tensor_affine(args[0], s, z, 0, 255), *args[1:])

    with torch.no_grad():
        for name, m in layers:
            flat = m.weight.reshape(m.weight.shape[0], -1)
            lo, hi = flat.min(1).values.clamp(max=0), flat.max(1).values.clamp(min=0)
            scale = ((hi - lo) / 255.0).clamp(min=1e-12)
            zp = (-128 - torch.round(lo / scale)).clamp(-128, 127).to(torch.int32)
            m.weight.copy_(torch.fake_quantize_per_channel_affine(m.weight, scale, zp, 0, -128, 127))
            if name in ranges and name != first:
                m.register_forward_pre_hook(fake_input(*ranges[name]))
        return q(x_eval)


def reference_cell(arch: str) -> dict:
    """The independent reference's W8A8 agreement, on the same model, calibration and inputs as the cells."""
    import torch
    from hydra import compose, initialize_config_dir

    from dfq_bench.calib.sources import Noise
    from dfq_bench.config import CONF_DIR
    from dfq_bench.models import reestimate_bn
    from dfq_bench.registry import DATASETS
    from dfq_bench.run.runner import bn_images, build_model, seed_everything

    over = cell_overrides(arch, "rtn", "w8a8")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=over)
    seed_everything(cfg.seed)
    built = build_model(cfg)
    bundle = DATASETS.get(cfg.dataset.name)(cfg.dataset, built)
    reestimate_bn(built, *bn_images(bundle, cfg.model.bn_reestimate))
    calib = Noise.generate(cfg.data, built.model, built.input_size, cfg.seed, "cpu", bundle)[0]
    x, agree, n = None, 0, 0
    with torch.no_grad():
        for x, _ in bundle.loader:
            agree += int((reference_w8a8(built.model, calib, x).argmax(1) == built.model(x).argmax(1)).sum())
            n += len(x)
    return {"arch": arch, "method": "torch_reference", "setting": "w8a8", "status": "ok",
            "agree": 100.0 * agree / n, "weights": built.weights}


def run_arch(arch: str, out: Path, methods: list[str], done: list[dict]) -> list[dict]:
    """The cells of one architecture for ``methods``, in this process; cells in ``done`` are kept."""
    from hydra import compose, initialize_config_dir

    from dfq_bench.config import CONF_DIR, UnsupportedError, register_configs, validate_config
    from dfq_bench.run.runner import run

    register_configs()
    have = {(c["method"], c["setting"]) for c in done if c["status"] in ("ok", "refused")}
    cells = [c for c in done if (c["method"], c["setting"]) in have]
    for method, setting in [(m, s) for m in methods for s in SETTINGS if (m, s) not in have]:
        over = cell_overrides(arch, method, setting)
        over += [f"results_dir={out / 'rows'}", f"eval_cache={out / 'eval_cache'}", "progress=false"]
        cell = {"arch": arch, "method": method, "setting": setting,
                "command": "python -m dfq_bench " + " ".join(cell_overrides(arch, method, setting))}
        t0 = time.perf_counter()
        try:
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                cfg = compose(config_name="config", overrides=over)
            validate_config(cfg)
            row = run(cfg, progress=False)
            cell.update(status="ok", agree=row["agree_fp32"], kl=row["kl_fp32"], top1=row["top1"],
                        top1_fp32=row["top1_fp32"], t_quant_s=row["t_quant_s"], run_id=row["run_id"],
                        n_relu6_to_relu=row.get("n_relu6_to_relu", 0), n_bn_folded=row.get("n_bn_folded"),
                        n_norm_act_split=row.get("n_norm_act_split"), bn_fold_rule=row.get("bn_fold_rule"),
                        n_bn_unfolded=row.get("n_bn_unfolded"))
        except UnsupportedError as e:
            cell.update(status="refused", reason=str(e))
        except Exception as e:  # a crash is a coverage failure: recorded, never hidden
            cell.update(status="crashed", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
        cell["t_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(cell), flush=True)
        cells.append(cell)
    if ("torch_reference", "w8a8") not in have:
        cells.append(reference_cell(arch))
    return cells


def verdict(cell: dict, ref: float | None = None) -> tuple[bool, str]:
    """(passes, note) for one cell; ``ref``: the independent reference's W8A8 agreement on its model."""
    if cell["status"] == "refused":
        return True, "refused"
    if cell["status"] != "ok":
        return False, "crashed"
    if cell["setting"] == "fe":
        if cell["method"] == "dfq" and cell.get("n_relu6_to_relu"):
            return True, f"ReLU6->ReLU at {cell['n_relu6_to_relu']} sites (documented)"
        ok = cell["agree"] >= FE_AGREE and cell["kl"] < FE_KL
        return ok, "" if ok else f"not preserved (target agreement {FE_AGREE:g}%, KL < {FE_KL:g})"
    ok = cell["agree"] >= W8_AGREE
    if ok:
        return True, ""
    if ref is not None and ref < W8_AGREE:
        return False, f"agreement below {W8_AGREE:g}%; the independent reference gets {ref:.0f}% here"
    return False, f"agreement below {W8_AGREE:g}%"


def table(cells: list[dict]) -> str:
    by = {(c["arch"], c["method"], c["setting"]): c for c in cells}
    archs = [a for a in ARCHS if any(k[0] == a for k in by)] + sorted({k[0] for k in by} - set(ARCHS))
    lines = ["| architecture | BN folded / split / left | torch reference W8A8 | "
             + " | ".join(METHODS) + " |", "|:---|:---|:---|" + "|".join([":---"] * len(METHODS)) + "|"]
    failures, refusals = [], {}
    cells = [c for c in cells if c["setting"] in SETTINGS and c["method"] in METHODS]
    for arch in archs:
        first = next((by[(arch, m, s)] for m in METHODS for s in SETTINGS
                      if (arch, m, s) in by and by[(arch, m, s)]["status"] == "ok"), None)
        fold = "-" if first is None else (f"{first['n_bn_folded']} / {first['n_norm_act_split']} / "
                                          f"{first['n_bn_unfolded']}" + (" (module rule)"
                                                                          if first["bn_fold_rule"] == "module" else ""))
        cols = []
        for m in METHODS:
            parts = []
            for s in SETTINGS:
                c = by.get((arch, m, s))
                if c is None:
                    parts.append("not run")
                    continue
                ref = by.get((arch, "torch_reference", "w8a8"))
                ok, note = verdict(c, None if ref is None else ref["agree"])
                if c["status"] == "refused":
                    refusals[(arch, m)] = c["reason"]
                    parts.append("refused")
                    continue
                if c["status"] != "ok":
                    failures.append(f"{arch} {m} {s}: {c['reason']}")
                    parts.append("**crashed**")
                    continue
                mark = "" if ok else " **FAIL**"
                txt = f"{c['agree']:.0f}% / {c['kl']:.0e}"
                if note and ok:
                    txt += "†"
                parts.append(txt + mark)
                if not ok:
                    failures.append(f"{arch} {m} {s}: {note}")
            cols.append(" ; ".join(dict.fromkeys(parts)) if all(p == "refused" for p in parts) else " ; ".join(parts))
        ref = by.get((arch, "torch_reference", "w8a8"))
        ref = "-" if ref is None else f"{ref['agree']:.0f}%"
        lines.append(f"| {arch} | {fold} | {ref} | " + " | ".join(cols) + " |")
    out = ["\n".join(lines), ""]
    not_run = len(archs) * len(METHODS) * len(SETTINGS) - len(cells)
    n_pass = sum(verdict(c)[0] and c["status"] == "ok" for c in cells)
    n_refused = sum(c["status"] == "refused" for c in cells)
    out.append(f"{len(archs)} architectures, {len(cells)} cells run: {n_pass} pass, {len(failures)} below the "
               f"bar, {n_refused} refused" + (f"; {not_run} not run." if not_run else "."))
    if refusals:
        out += ["", "Refusals (one line each, before any work; no row is written):", ""]
        out += [f"- {a} / {m}: `{r}`" for (a, m), r in refusals.items()]
    relu6 = sorted({c["arch"] for c in cells if c["method"] == "dfq" and c["setting"] == "fe"
                    and c["status"] == "ok" and c.get("n_relu6_to_relu")})
    if relu6:
        out += ["", "† DFQ replaces ReLU6 by ReLU (the paper's step, `method.relu6_to_relu`), which changes the "
                "float function; its 16-bit row is not a preservation check on " + ", ".join(relu6) + "."]
    if failures:
        out += ["", "Below the bar:", ""] + [f"- {f}" for f in failures]
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/coverage")
    ap.add_argument("--archs", nargs="*", default=ARCHS)
    ap.add_argument("--methods", nargs="*", default=METHODS, choices=METHODS)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child: run one architecture here
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    cells_dir = out / "cells"
    if args.one:
        from dfq_bench.results import write_json

        path = cells_dir / f"{args.one.replace(':', '__')}.json"
        done = json.loads(path.read_text())["cells"] if path.exists() else []
        cells = run_arch(args.one, out, args.methods, done)
        write_json(path, {"arch": args.one, "cells": cells})
        return
    cells_dir.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        for arch in args.archs:
            path = cells_dir / f"{arch.replace(':', '__')}.json"
            have = {(c["method"], c["setting"]) for c in json.loads(path.read_text())["cells"]
                    if c["status"] in ("ok", "refused")} if path.exists() else set()
            if all((m, s) in have for m in args.methods for s in SETTINGS):
                print(f"[coverage] {arch}: done already ({path})")
                continue
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--out", str(out), "--one", arch,
                                   "--methods", *args.methods], cwd=REPO,
                                  env={**os.environ, "HYDRA_FULL_ERROR": "0"}, capture_output=True, text=True)
            print(f"[coverage] {arch}: exit {proc.returncode} in {time.perf_counter() - t0:.0f} s")
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
    cells = []
    for path in sorted(cells_dir.glob("*.json")):
        cells += json.loads(path.read_text())["cells"]
    text = table(cells)
    print(text)
    md = out.parent / "coverage.md"
    body = md.read_text().split("<!-- matrix -->")[0] if md.exists() else "# Coverage\n\n"
    md.write_text(body + "<!-- matrix -->\n" + text)


if __name__ == "__main__":
    main()
