#!/usr/bin/env bash
# Mixed precision (issue 16, core/mixed.py): the accuracy/size frontier of RTN and SQuant on resnet20_fmnist and
# mobilenetv2_fmnist, full Fashion-MNIST test set, average weight bits 2.5, 3, 3.5, 4, 5, 6 (mp.avg_wbits: the
# allocated layers; first/last at the protocol's 8 bits), A8 and A4, allocators dp (the frontier), greedy, uniform
# (the widest uniform plan that fits) and random (same budget, mp.seed 0, 1, 2), common protocol, data=noise.
# One sensitivity pass per (model, method): the other jobs find it in the cache ($DFQ_BENCH_CACHE/mp/).
# Usage: scripts/sweep_mp.sh [override ...]   rows -> ${R:-results/mixed_precision}/runs.jsonl (reruns skip finished
#        run_ids); B= the budgets (default 2.5,3,3.5,4,5,6); a trial: R=/tmp/mp B=3 scripts/sweep_mp.sh dataset.limit=200
# Table and plots: python scripts/table_mp.py $R/runs.jsonl (the sweep ends with it)
set -euo pipefail
R=${R:-results/mixed_precision}
E=${E:-$HOME/.cache/dfq_bench/eval}   # FP32 logits cache (not part of the run_id)
B=${B:-2.5,3,3.5,4,5,6}
S=${S:-0,1,2}                         # the random allocator's seeds (S=0: one; rerun with S=0,1,2 to add the others)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
for M in resnet20_fmnist mobilenetv2_fmnist; do
  C=(model=$M dataset=fashion_mnist results_dir=$R eval_cache=$E progress=false method=rtn,squant abits=8,4
     mp.avg_wbits=$B)
  python -m dfq_bench -m "${C[@]}" mp.allocator=dp,greedy,uniform "$@"
  python -m dfq_bench -m "${C[@]}" mp.allocator=random mp.seed=$S "$@"
done
python scripts/table_mp.py "$R/runs.jsonl"
