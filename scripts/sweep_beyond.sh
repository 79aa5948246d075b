#!/usr/bin/env bash
# Beyond uniform rounding (results/beyond_uniform.md): RTN, SQuant, PowerQuant and REx (K = 2, 25/50/100%
# of the output channels kept in order 2) on the three embedded models, full Fashion-MNIST test set,
# weight-only W2/W3/W4 and W4A4, W8A8, common protocol.
# Usage: scripts/sweep_beyond.sh      rows -> ${R:-results/beyond_uniform}/runs.jsonl (reruns skip finished run_ids)
# Table: python scripts/table_beyond.py results/beyond_uniform/runs.jsonl
set -euo pipefail
R=${R:-results/beyond_uniform}
E=${E:-$HOME/.cache/dfq_bench/eval}   # FP32 logits cache (not part of the run_id)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
for M in resnet20_fmnist vgg_fmnist mobilenetv2_fmnist; do
  C=(model=$M dataset=fashion_mnist results_dir=$R eval_cache=$E progress=false)
  for B in "wbits=2,3,4 abits=null" 'wbits=4,8 abits=${wbits}'; do
    python -m dfq_bench -m method=rtn,squant,powerquant "${C[@]}" $B
    python -m dfq_bench -m method=rex method.orders=2 method.keep=0.25,0.5,1.0 "${C[@]}" $B
  done
done
