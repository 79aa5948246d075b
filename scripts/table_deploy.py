"""Markdown table of the deployed-integer check (results/deploy.md) from result rows.

Reads rows only (the last ok row per run_id wins) and prints one line per run that has the
``deploy=onnxruntime`` fields: fake-quant vs integer-ORT top-1, their agreement, the int32-bias
simulation (what the integer model computes, in torch) and its agreement with the integer model, the
integer operators ORT's optimized graph runs, and the three latencies measured in the run.

Usage::

    python scripts/table_deploy.py results/deploy/runs.jsonl > table.md
"""

from __future__ import annotations

import argparse

from dfq_bench.results import LastOk


def line(r: dict) -> str:
    ops = ", ".join(f"{k} {v}" for k, v in sorted(r["int_ops"].items()))
    lay = r["deploy_layers"]
    return (f"| {r['model']} | W{r['wbits']}A{r['abits']} | {r['method']} | {r['top1']:.2f} | {r['top1_int']:.2f} "
            f"| {r['top1_int'] - r['top1']:+.2f} | {r['agree_int']:.2f} | {r['max_logit_diff']:.3f} "
            f"| {r['top1_sim_int32_bias']:.2f} | {r['agree_int_sim_int32_bias']:.2f} | {ops} "
            f"| {lay['requantized']} / {lay['conv_integer']} / {lay['float']} | {r['lat_fp32_torch_ms']:.1f} "
            f"| {r['lat_fp32_ort_ms']:.1f} | {r['lat_int_ort_ms']:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+")
    args = ap.parse_args()
    latest = [r for r in LastOk().read(*args.runs).ok.values() if r.get("deploy") == "onnxruntime"]
    rows = sorted(latest, key=lambda r: (r["model"], -r["wbits"], ["rtn", "squant", "dfq"].index(r["method"])
                                         if r["method"] in ("rtn", "squant", "dfq") else 9, r["method"]))
    n_eval = sorted({r["n_eval"] for r in rows})
    threads = sorted({r.get("lat_threads") for r in rows}, key=str)
    print(f"{len(rows)} runs, n_eval {', '.join(map(str, n_eval))}, latency threads {', '.join(map(str, threads))}\n")
    print("| model | bits | method | top-1 fake-quant | top-1 integer (ORT) | diff | agree_int % | max logit diff "
          "| top-1 sim. int32 bias | agree int vs sim. int32 bias % | integer ops in ORT graph "
          "| layers requant / ConvInteger / float | FP32 torch ms | FP32 ORT ms | int ORT ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(line(r))


if __name__ == "__main__":
    main()
