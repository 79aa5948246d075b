"""DFQ ablation tables.

    python scripts/table_dfq.py /tmp/dfq_ablation/results/runs.jsonl [more.jsonl ...]
    python scripts/table_dfq.py --spread MODEL [--bits 8]

The first form reads result rows only (the last ok row per run_id wins) and prints one Markdown
table per (model, dataset): rows of ``rtn`` and ``dfq``, each DFQ row labelled by the steps its
method config turns on. The second builds a registered model (its configured weights), folds BN,
replaces ReLU6 and prints, per depthwise conv, how far its per-channel weight ranges spread (max
over median channel range) and the per-tensor weight SQNR at ``--bits``, before and after CLE.
"""

from __future__ import annotations

import sys

from dfq_bench.results import LastOk

STEP_ORDER = ["RTN, min/max ranges", "none (BN fold + bn ranges)", "ReLU6->ReLU only", "+CLE",
              "+absorption", "+bias correction"]


def step(row: dict) -> str:
    if row["method"] == "rtn":
        return STEP_ORDER[0]
    c = row["method_cfg"]
    if c["bias_correction"] and c["bias_absorption"] and c["cle"]:
        return "+bias correction"
    if c["bias_absorption"] and c["cle"]:
        return "+absorption"
    if c["cle"]:
        return "+CLE"
    if c["relu6_to_relu"]:
        return "ReLU6->ReLU only"
    return "none (BN fold + bn ranges)" if not (c["bias_absorption"] or c["bias_correction"]) else "other"


def scope(row: dict) -> str:
    c = row.get("method_cfg", {})
    if row["method"] != "dfq" or not c.get("relu6_to_relu"):
        return "-"
    return c.get("relu6_scope", "all")


def fmt(v, spec=".2f") -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    head = ("| W/A | step | ReLU6 scope | top-1 | FP32 | delta | agree | KL | ReLU6->ReLU | CLE pairs (sweeps) "
            "| absorbed layers (channels) | bias-corrected | bn-rule ranges / act quant | t_quant s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    key = lambda r: (-r["wbits"], STEP_ORDER.index(step(r)) if step(r) in STEP_ORDER else 99, scope(r))  # noqa: E731
    for r in sorted(rows, key=key):
        g = r.get
        cle = "-" if g("n_cle_pairs") is None else f"{g('n_cle_pairs')} ({g('cle_iters')})"
        absorbed = "-" if g("n_absorbed") is None else f"{g('n_absorbed')} ({g('n_absorbed_channels')})"
        acts = f"{fmt(g('n_act_bn_rule'), 'd') if g('n_act_bn_rule') is not None else 0} / {g('n_act_quant')}"
        lines.append(
            f"| W{r['wbits']}A{r['abits']} | {step(r)} | {scope(r)} | {fmt(r['top1'])} | {fmt(r['top1_fp32'])} "
            f"| {fmt(r['delta_top1'], '+.2f')} | {fmt(r['agree_fp32'])} | {fmt(r['kl_fp32'], '.3f')} "
            f"| {fmt(g('n_relu6_to_relu'), 'd')} | {cle} | {absorbed} | {fmt(g('n_bias_corrected'), 'd')} "
            f"| {acts} | {fmt(r['t_quant_s'], '.1f')} |"
        )
    return "\n".join(lines)


def spread(model_name: str, bits: int) -> None:
    import copy

    import torch
    from dfq_bench.methods.dfq import equalize
    from omegaconf import OmegaConf

    from dfq_bench import catalog  # noqa: F401
    from dfq_bench.config import CONF_DIR, ModelConfig
    from dfq_bench.core.bn import fold_bn
    from dfq_bench.core.grid import weight_grid
    from dfq_bench.graph import equalization_links, relu6_to_relu
    from dfq_bench.registry import MODELS

    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(CONF_DIR / "model" / f"{model_name}.yaml"))
    model = MODELS.get(model_name)(cfg).model.eval()
    before, _ = relu6_to_relu(copy.deepcopy(model))
    fold_bn(before)
    after = copy.deepcopy(before)
    res = equalize(after, equalization_links(after))

    def stats(w):
        w = w.detach()
        r = w.abs().flatten(1).amax(1)
        q = weight_grid(w, bits, per_channel=False, symmetric=False).fake(w)
        sqnr = 10 * torch.log10(w.pow(2).sum() / (q - w).pow(2).sum())
        return float(r.max() / r.median()), float(sqnr)

    print(f"### {model_name}: depthwise convs after BN folding, before / after CLE ({res.iters} sweeps)\n")
    print(f"| layer | channels | max/median channel range | per-tensor W{bits} SQNR dB |")
    print("|---|---|---|---|")
    rows = []
    for name, m in before.named_modules():
        if isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels:
            (s0, q0), (s1, q1) = stats(m.weight), stats(after.get_submodule(name).weight)
            rows.append((s0, s1, q0, q1))
            print(f"| {name} | {m.out_channels} | {s0:.1f} / {s1:.1f} | {q0:.1f} / {q1:.1f} |")
    if rows:
        med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
        print(f"| median over {len(rows)} | | {med([r[0] for r in rows]):.1f} / {med([r[1] for r in rows]):.1f} "
              f"| {med([r[2] for r in rows]):.1f} / {med([r[3] for r in rows]):.1f} |")


def main(paths: list[str]) -> None:
    groups: dict[tuple, list[dict]] = {}
    for row in LastOk().read(*paths).ok.values():
        if row["method"] in ("rtn", "dfq"):
            groups.setdefault((row["model"], row["dataset"]), []).append(row)
    for (model, dataset), rows in sorted(groups.items()):
        n_eval = sorted({r["n_eval"] for r in rows})
        print(f"### {model} / {dataset} (n_eval {', '.join(map(str, n_eval))})\n")
        print(table(rows) + "\n")


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args:
        sys.exit("usage: python scripts/table_dfq.py RUNS.jsonl [...] | --spread MODEL [--bits N]")
    if args[0] == "--spread":
        spread(args[1], int(args[3]) if len(args) > 3 and args[2] == "--bits" else 8)
    else:
        main(args)
