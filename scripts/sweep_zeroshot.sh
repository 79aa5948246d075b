#!/usr/bin/env bash
# The zero-shot QAT table of results/zeroshot.md (issue 15): cpu presets, common protocol, the full 10k
# Fashion-MNIST test split, beside FP32 (every row's top1_fp32), RTN, SQuant and GENIE of the same protocol.
# Phases (P, default "1 2 3 4 5 6 7"), most informative first; each W4A4 run of a cpu preset is ~4 min on 2 cores:
#   1: rtn, squant (W4A4 only: it has no activation k for 3 bits; seconds), gdfq_cpu, adadfq_cpu on resnet20_fmnist, W4A4 and W3A3, seed 0
#   2: qimera_cpu, granq_cpu (dynamic ranges, its released behaviour) and granq_cpu with the protocol's
#      static ranges (method.a_granularity=protocol), resnet20_fmnist, W4A4 and W3A3, seed 0
#   3: adadfq_cpu's controls at W4A4: fine-tuned on noise images, on real training images, and the
#      generator's samples for calibration only (method.finetune=false)
#   4: genie_cpu on resnet20_fmnist, W4A4 and W3A3, and on mobilenetv2_fmnist, W4A4
#   5: mobilenetv2_fmnist W4A4, seed 0: rtn, squant, gdfq, qimera, adadfq, granq (dynamic and static)
#   6: seeds 1 and 2 of gdfq_cpu and adadfq_cpu on resnet20_fmnist, W4A4 and W3A3
#   7: the references' protocol (protocol=zsqat_paper) at W4A4 on resnet20_fmnist, seed 0: gdfq_cpu and adadfq_cpu
#      with activation quantizers after every ReLU (the preset) and at every layer input (the core's placement),
#      each with the protocol's quantizer and with the references' (method.quantizer=reference)
# Usage: [P="1 2"] scripts/sweep_zeroshot.sh   rows -> ${R:-results/zeroshot}/runs.jsonl; a rerun (or the next
#        part) skips run_ids that already have an ok row, so it can be finished in parts.
# Table: python scripts/table_zeroshot.py results/zeroshot/runs.jsonl
set -euo pipefail
R=${R:-results/zeroshot}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
C=(dataset=fashion_mnist results_dir=$R progress=false 'abits=${wbits}')
R20=(model=resnet20_fmnist wbits=4,3 "${C[@]}")
for phase in ${P:-1 2 3 4 5 6 7}; do
  case $phase in
    1) python -m dfq_bench -m method=rtn "${R20[@]}"   # squant: no activation k for 3 bits (method.k)
       python -m dfq_bench -m method=squant model=resnet20_fmnist wbits=4 "${C[@]}"
       python -m dfq_bench -m method=gdfq_cpu,adadfq_cpu "${R20[@]}" ;;
    2) python -m dfq_bench -m method=qimera_cpu,granq_cpu "${R20[@]}"
       python -m dfq_bench -m method=granq_cpu method.a_granularity=protocol "${R20[@]}" ;;
    3) A=(method=adadfq_cpu model=resnet20_fmnist wbits=4 "${C[@]}")
       python -m dfq_bench -m "${A[@]}" data=noise method.samples=noise
       python -m dfq_bench -m "${A[@]}" data=real method.samples=real
       python -m dfq_bench -m "${A[@]}" method.finetune=false ;;
    4) python -m dfq_bench -m method=genie_cpu "${R20[@]}"
       python -m dfq_bench -m method=genie_cpu model=mobilenetv2_fmnist wbits=4 "${C[@]}" ;;
    5) M=(model=mobilenetv2_fmnist wbits=4 "${C[@]}")
       python -m dfq_bench -m method=rtn,squant,gdfq_cpu,qimera_cpu,adadfq_cpu,granq_cpu "${M[@]}"
       python -m dfq_bench -m method=granq_cpu method.a_granularity=protocol "${M[@]}" ;;
    6) python -m dfq_bench -m method=gdfq_cpu,adadfq_cpu seed=1,2 "${R20[@]}" ;;
    7) python -m dfq_bench -m method=gdfq_cpu,adadfq_cpu protocol=zsqat_paper protocol.a_placement=after_relu,layer_input \
         method.quantizer=protocol,reference model=resnet20_fmnist wbits=4 "${C[@]}" ;;
  esac
done
