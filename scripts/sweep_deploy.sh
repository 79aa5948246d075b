#!/usr/bin/env bash
# The deployed-integer table of results/deploy.md: RTN, SQuant and DFQ at W8A8 and W4A4 on the three
# embedded models, full 10k test split, each run exported to ONNX and executed with ORT's integer kernels.
# Usage: scripts/sweep_deploy.sh      rows -> ${R:-results/deploy}/runs.jsonl (reruns skip finished run_ids)
set -euo pipefail
R=${R:-results/deploy}
E=${E:-$HOME/.cache/dfq_bench/eval}   # FP32 logits cache (not part of the run_id)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # one thread per run; latencies are compared at that count
python -m dfq_bench -m method=rtn,squant,dfq model=resnet20_fmnist,mobilenetv2_fmnist,vgg_fmnist \
  wbits=8,4 'abits=${wbits}' deploy=onnxruntime results_dir=$R eval_cache=$E
