#!/usr/bin/env bash
# The DFQ ablation of results/dfq_ablation.md: per-tensor W8A8 and W6A6 (protocol=dfq_paper), each DFQ
# step added in turn, beside RTN with min/max ranges, on the depthwise models.
# Usage: scripts/sweep_dfq.sh      rows -> ${R:-results/dfq_ablation}/runs.jsonl (reruns skip finished run_ids)
# Table: python scripts/table_dfq.py results/dfq_ablation/runs.jsonl
set -euo pipefail
R=${R:-results/dfq_ablation}
E=${E:-$HOME/.cache/dfq_bench/eval}   # FP32 logits cache (not part of the run_id)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
for MD in "mobilenetv2_fmnist fashion_mnist" "efficientnet_lite0 imagenet_samples"; do
  set -- $MD
  C=(model=$1 dataset=$2 protocol=dfq_paper wbits=8,6 'abits=${wbits}' results_dir=$R eval_cache=$E)
  python -m dfq_bench -m method=rtn "${C[@]}"
  D=(method=dfq "${C[@]}")
  python -m dfq_bench -m "${D[@]}" method.relu6_to_relu=false method.cle=false method.bias_absorption=false \
    method.bias_correction=false                                                  # none: BN fold + bn ranges
  python -m dfq_bench -m "${D[@]}" method.cle=false method.bias_absorption=false method.bias_correction=false
  python -m dfq_bench -m "${D[@]}" method.bias_absorption=false method.bias_correction=false   # +CLE
  python -m dfq_bench -m "${D[@]}" method.bias_correction=false                   # +absorption
  python -m dfq_bench -m "${D[@]}"                                                # +bias correction
  S=("${D[@]}" method.relu6_scope=safe)   # ReLU6 -> ReLU only where BN statistics keep it exact
  python -m dfq_bench -m "${S[@]}" method.bias_absorption=false method.bias_correction=false   # +CLE
  python -m dfq_bench -m "${S[@]}" method.bias_correction=false                   # +absorption
  python -m dfq_bench -m "${S[@]}"                                                # +bias correction
done
