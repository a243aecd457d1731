#!/usr/bin/env bash
# Local CPU run, nothing downloaded: synthetic music -> a tiny local codec and T5 -> ArrayRecord codes -> a tiny MAGNeT
# trained on 8 simulated CPU devices (the same sharded code path as a pod).
#
#   bash launch/train_local.sh [extra train flags...]          e.g. --config.train.num_steps=500
#
# Environment: OUT (output directory, default runs/local), NUM_CLIPS (training clips, default 64), MAGNET_VENV
# (default .venv). Every stage is resumable: rerunning skips finished data and resumes training from $OUT/run.
# Results: $OUT/run/metrics.jsonl, TensorBoard logs in $OUT/run/tensorboard, the exported model in $OUT/run/export.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${MAGNET_VENV:-.venv}/bin/python
out=${OUT:-runs/local}
mkdir -p "$out"
out=$(cd "$out" && pwd)  # absolute: the exported model's config.json names its text encoder and codec by path
export XLA_FLAGS=${XLA_FLAGS:---xla_force_host_platform_device_count=8}

[ -d "$out/corpus" ] || $py -m data_pipelines.synthetic_corpus --output="$out/corpus" --num_clips="${NUM_CLIPS:-64}" \
  --seconds=6 --seed=0
[ -d "$out/corpus_eval" ] || $py -m data_pipelines.synthetic_corpus --output="$out/corpus_eval" --num_clips=16 \
  --seconds=6 --seed=1
[ -d "$out/assets" ] || $py -m data_pipelines.make_tiny_assets --corpus="$out/corpus" --output="$out/assets"
for split in corpus corpus_eval; do
  $py -m data_pipelines.encode_audio --input="$out/$split" --output="$out/codes/$split" --codec="$out/assets/codec" \
    --segment_seconds=5 --chunk_seconds=5 --records_per_shard=16
done

$py -m magnet_jax.train --config=configs/magnet.py:size=tiny,duration=5 --workdir="$out/run" \
  --config.data.train_files="$out/codes/corpus/*.array_record" \
  --config.data.eval_files="$out/codes/corpus_eval/*.array_record" \
  --config.conditioner.t5="$out/assets/t5" --config.codec.source="$out/assets/codec" \
  --config.optim.lr=3e-3 "$@"
