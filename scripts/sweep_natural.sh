#!/usr/bin/env bash
# Real ImageNet weights over dataset=natural_images (results/natural_images.md): EfficientNet-Lite0/1/2,
# W4A32, W3A32, W4A4, W6A6, W8A8, common protocol, seed 0. Phases (P, default "1 2 3"), cheapest first:
#   1: rtn, squant            2: dfq with relu6_scope all (the paper's) and safe
#   3: squant's ablation modes squant-k, squant-c, squant-e
#   4: zeroq (data=zeroq_cpu) and genie (genie_cpu preset): hours per model on 2 CPU cores
# Usage: [P="1 2"] [MODELS="efficientnet_lite0"] scripts/sweep_natural.sh
#        rows -> ${R:-results/natural_images}/runs.jsonl (reruns skip finished run_ids)
# Table: python scripts/table_natural.py results/natural_images/runs.jsonl
set -euo pipefail
R=${R:-results/natural_images}
E=${E:-$HOME/.cache/dfq_bench/eval}   # FP32 logits cache (not part of the run_id)
K=${K:-$HOME/.cache/dfq_bench/checkpoints}  # GENIE-M's finished blocks: a stopped run resumes (not in the run_id)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
for phase in ${P:-1 2 3}; do
  for M in ${MODELS:-efficientnet_lite0 efficientnet_lite1 efficientnet_lite2}; do
    C=(model=$M dataset=natural_images results_dir=$R eval_cache=$E progress=false)
    for B in "wbits=4,3 abits=null" 'wbits=4,6,8 abits=${wbits}'; do
      case $phase in
        1) python -m dfq_bench -m method=rtn,squant "${C[@]}" $B ;;
        2) python -m dfq_bench -m method=dfq method.relu6_scope=all,safe "${C[@]}" $B ;;
        3) python -m dfq_bench -m method=squant method.mode=squant-k,squant-c,squant-e "${C[@]}" $B ;;
        4) python -m dfq_bench -m method=zeroq data=zeroq_cpu "${C[@]}" $B
           python -m dfq_bench -m method=genie_cpu "${C[@]}" checkpoint_dir=$K $B ;;
      esac
    done
  done
done
