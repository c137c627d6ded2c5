#!/usr/bin/env bash
# Aspect-ratio buckets on PixArt below sample size 128: the same tiny PixArt recipe trained on whole pictures of
# three shapes in buckets, and on their square center crops, then compared (compare.py), per seed. Resumable: a
# finished step is skipped.
#   experiments/pixart_buckets/measure.sh <out folder> <steps> [seeds...]
set -euo pipefail
out=$1 steps=$2
shift 2
data=$out/data
[[ -f $data/drawn.jsonl ]] || .venv/bin/python experiments/pixart_buckets/make_data.py "$data"
DATA=(data=folder "data.source.root=$data" data.source.caption_extension=.txt data.source.index_workers=0
      data.resolution=32 data.num_val=192)
BUCKETS=(+data/buckets=novelai data.buckets.max_area=1536 data.buckets.min_side=32 data.buckets.max_side=48
         data.buckets.step=16 data.buckets.base_side=32 data.buckets.max_ar_error=0.5)
if [[ ! -f $out/autoencoder/checkpoints/last.ckpt ]]; then  # the quickstart's, on square crops of these pictures
  .venv/bin/python run.py experiment=quickstart max_steps=2400 val_every_n_steps=600 model.loss.disc_start=2100 \
    "${DATA[@]}" hydra.run.dir=$out/autoencoder
fi
RECIPE=(model=dit_text_tiny model/objective=ddpm_v model.objective.timestep_density.weighting_scheme=logit_normal
        model.objective.timestep_density.logit_mean=-1.0 precision=fp32 model.lr=1e-3 model.ema_decay=0.999
        data.batch_size=32 max_steps=$steps val_every_n_steps=$((steps / 4)) sample.num_images=4
        sample.guidance_scale=3 data.random_flip=false "model.first_stage=$out/autoencoder/checkpoints/last.ckpt")
for seed in "${@:-0}"; do
  for run in buckets square; do
    extra=()
    [[ $run == buckets ]] && extra=("${BUCKETS[@]}")
    [[ -f $out/seed$seed/$run/checkpoints/last.ckpt ]] || .venv/bin/python run.py "${RECIPE[@]}" "${DATA[@]}" \
      "${extra[@]}" seed=$seed data.seed=0 hydra.run.dir=$out/seed$seed/$run
  done
  [[ -f $out/seed$seed/compare/results.json ]] || .venv/bin/python experiments/pixart_buckets/compare.py \
    $out/seed$seed/buckets $out/seed$seed/square "$data" --out $out/seed$seed/compare
done
