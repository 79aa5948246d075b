#!/usr/bin/env bash
# The synthetic-data comparison of results/synthetic_data.md: FP32, RTN, ZeroQ and GENIE with their
# noise / real-data controls, W4A4 and W8A8, cpu presets, on the Fashion-MNIST zoo models.
# Usage: scripts/sweep_synth.sh [model ...]   (default: resnet20_fmnist mobilenetv2_fmnist)
# Rows go to ${R:-results/synthetic_data}/runs.jsonl; a rerun skips run_ids that already have an ok row.
set -euo pipefail
R=${R:-results/synthetic_data}
E=${E:-$HOME/.cache/dfq_bench/eval}   # FP32 logits cache (not part of the run_id)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # the 2 cores are shared: one intra-op thread per run
for M in "${@:-resnet20_fmnist mobilenetv2_fmnist}"; do
  for m in $M; do
    C=(model=$m dataset=fashion_mnist wbits=4,8 'abits=${wbits}' results_dir=$R eval_cache=$E)
    python -m dfq_bench -m method=rtn "${C[@]}"                                   # RTN: min/max on 256 noise images
    python -m dfq_bench -m method=zeroq data=zeroq_cpu,genie_cpu "${C[@]}"        # ZeroQ ranges on ZeroQ / GENIE-D data
    python -m dfq_bench -m method=zeroq data=noise,real data.num_samples=64 data.batch_size=64 "${C[@]}"
    python -m dfq_bench -m method=genie_cpu "${C[@]}"                             # GENIE: GENIE-M on GENIE-D data
    python -m dfq_bench -m method=genie_cpu data=noise,real data.num_samples=128 data.batch_size=128 "${C[@]}"
  done
done
