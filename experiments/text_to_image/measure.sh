#!/usr/bin/env bash
# The text quickstart's LDM over seeds, on one first stage, each evaluated at guidance 1, 1.5, 3 and 5 from the
# same noise (resumable: a seed whose evaluation.json exists is skipped).
#   experiments/text_to_image/measure.sh <first stage .ckpt> <out folder> [seeds...]
set -euo pipefail
first_stage=$1 out=$2
shift 2
for seed in "${@:-0 1 2}"; do
  if [[ ! -f $out/seed$seed/ldm/checkpoints/last.ckpt ]]; then
    .venv/bin/python run.py experiment=quickstart_text seed=$seed model.first_stage=$first_stage \
      hydra.run.dir=$out/seed$seed/ldm
  fi
  if [[ ! -f $out/seed$seed/evaluation/evaluation.json ]]; then
    .venv/bin/python run.py experiment=quickstart_text task=evaluate seed=$seed evaluate.num_samples=128 \
      'evaluate.guidance_scales=[1,1.5,3,5]' evaluate.model=$out/seed$seed/ldm/checkpoints/last.ckpt \
      hydra.run.dir=$out/seed$seed/evaluation
  fi
  grep -ho "guidance [0-9.]*: prompt adherence.*" $out/seed$seed/evaluation/run.log
done
