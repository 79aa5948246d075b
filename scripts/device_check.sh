#!/usr/bin/env bash
# The device=cuda check: one short script for a GPU machine (the `device` tool's H200, about 15 minutes of
# device time per task; never part of the tests or CI). Prepare here once with scripts/device_prep.sh
# (.dev/: wheels, the Fashion-MNIST test split), then
#   run(command="bash scripts/device_check.sh", carry=[".dev"], timeout_s=560)
# Locally, as a smoke test of the script itself: DEV=cpu QUICK=1 bash scripts/device_check.sh
#
# Steps (each under its own `timeout`, so one hang costs its step only), everything logged to $OUT/log.txt;
# about 6 minutes expected on the H200 (not yet run there):
#   1. the machine: nvidia-smi, torch, CUDA
#   2. every method on resnet20_fmnist W4A4 (zero-shot QAT and GENIE: their cpu presets), device=$DEV, the
#      full 10k test split
#   3. scripts/bench_squant.py --device $DEV (resnet18, mobilenet_v2; random init)
#   4. paper-preset step timings on efficientnet_lite0 / natural_images W4A4: GENIE-D (data=genie, one batch
#      of 128 images, STEPS=20 steps), GENIE-M (method=genie, 20,000 -> STEPS steps per block), GDFQ and
#      AdaDFQ (paper sizes: batch 200; 2 epochs x STEPS iterations, the first the generator's warm-up)
#   5. squant W4A4 on efficientnet_lite0 over natural_images (make demo-imagenet); rtn deploy=onnxruntime;
#      rtn, squant and dfq on resnet20_fmnist with device=cpu on the same machine (the CUDA - CPU top-1)
# Rows: $OUT/runs.jsonl; a table of them: $OUT/summary.txt (scripts/device_summary.py; its seconds per step
# are a phase's time over its steps, set-up and per-epoch evaluation included: upper bounds).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device_check}
DEV=${DEV:-cuda}
QUICK=${QUICK:-0}   # 1: a few hundred images and steps, to check the script on a CPU
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 DFQ_BENCH_CACHE=${DFQ_BENCH_CACHE:-/tmp/dfq_bench_cache}
PY=${PYTHON:-python3}
if [ -d .dev/whl ] && ! $PY -c "import hydra, omegaconf" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .dev/whl/*.whl && export PYTHONPATH=/tmp/site
fi
if ! $PY -c "import dfq_bench.methods" 2>/dev/null; then  # not installed: an editable install of this tree
  $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
fi
ROOT=dataset.root=.dev/fmnist
[ -d .dev/fmnist ] || ROOT=
LIMIT=null; STEPS=20; GB=128; ZB=200; BENCH="--repeats 3 --models resnet18,mobilenet_v2"
if [ "$QUICK" = 1 ]; then LIMIT=300; STEPS=2; GB=8; ZB=8; BENCH="--repeats 1 --models mobilenet_v2 --ref-elems 20000"; fi
R="results_dir=$OUT progress=false skip_done=false"
step() { local limit=$1; shift; echo; echo "=== $(date -u +%T) $*"; timeout "$limit" "$@"; echo "=== rc $?"; }
# A leading -m (Hydra's multirun: one process, the jobs in turn) goes first, as the CLI parses it; in a multirun
# over method=, a key of those methods is written ++method.key (the default method, squant, lacks it).
cli() {
  local limit=$1 m=(); shift; [ "$1" = -m ] && m=(-m) && shift
  step "$limit" $PY -m dfq_bench "${m[@]}" $R "$@"
}

step 30 nvidia-smi
step 60 $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-', 'threads', torch.get_num_threads())"

# Most telling first: the script may be stopped at the tool's limit, and the rows written so far come back.
F=(model=resnet20_fmnist $ROOT dataset.limit=$LIMIT wbits=4 abits=4)
Q=(); G=(); Z=()
[ "$QUICK" = 1 ] && Q=(++method.iters_per_epoch=$STEPS) && G=(data.steps=$STEPS method.steps=$STEPS) && Z=(data.steps=$STEPS)
cli 150 -m method=rtn,squant,dfq,powerquant,rex device=$DEV "${F[@]}"
cli 120 method=zeroq device=$DEV "${F[@]}" "${Z[@]}"
cli 120 method=genie_cpu device=$DEV "${F[@]}" "${G[@]}"
cli 200 -m method=gdfq_cpu,qimera_cpu,adadfq_cpu,granq_cpu device=$DEV "${F[@]}" "${Q[@]}"
step 120 $PY scripts/bench_squant.py --device "$DEV" --threads "$(nproc)" $BENCH

N=(model=efficientnet_lite0 dataset=natural_images wbits=4 abits=4)
cli 150 method=genie device=$DEV "${N[@]}" data.num_samples=$GB data.batch_size=$GB data.steps=$STEPS method.steps=$STEPS
cli 200 -m method=gdfq,adadfq device=$DEV "${N[@]}" ++method.epochs=2 ++method.warmup_epochs=1 \
    ++method.iters_per_epoch=$STEPS ++method.batch_size=$ZB ++method.calib_images=$((2 * ZB)) ++method.eval_images=100
cli 120 method=squant device=$DEV "${N[@]}"  # results/natural_images has its CPU row (top-1 63.8, KL 2.833)
cli 60 method=rtn device=$DEV deploy=onnxruntime "${F[@]}"
[ "$DEV" != cpu ] && cli 120 -m method=rtn,squant,dfq device=cpu "${F[@]}"
step 60 $PY scripts/device_summary.py "$OUT/runs.jsonl" | tee "$OUT/summary.txt"
