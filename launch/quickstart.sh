#!/usr/bin/env bash
# Quickstart: the whole magnet_jax pipeline on an embedded default, on CPU, with no downloads beyond pip.
#
#   bash launch/quickstart.sh
#
# 1. creates a virtual environment (quickstart_out/venv, pinned by constraints.txt; reused when it is up to date),
# 2. synthesizes a small music corpus (chord progressions on synth timbres, with matching descriptions) and a
#    held-out one for the eval split,
# 3. creates a tiny text encoder (random T5 + a tokenizer trained on the descriptions) and copies the tiny EnCodec
#    trained on synthetic music (data_pipelines/tiny_codec, made by data_pipelines/train_tiny_codec.py with a fixed
#    seed), the "embedded default": nothing is downloaded,
# 4. encodes both corpora into EnCodec codes (ArrayRecord shards),
# 5. trains the tiny MAGNeT (configs/magnet.py size=tiny, 4 s segments) on CPU, evaluating on the held-out codes,
# 6. runs the batch generation job on prompts drawn like the corpus descriptions (one continues an audio prompt),
#    and the same prompts on an untrained tiny MAGNeT,
# 7. checks the samples objectively (data_pipelines/quickstart_report.py): key, tempo, drums and brightness measured
#    from the audio with plain DSP, next to the corpus rendering of each prompt and the untrained model, the
#    held-out loss next to the codes' unigram entropy, and a spectrogram sheet (spectrograms.png).
# With the hub reachable, released weights generate instead:
#   python -m magnet_jax.generate --config=configs/generate.py:source=facebook/magnet-small-10secs \
#       --prompts=quickstart_out/prompts.jsonl --output_dir=quickstart_out/samples_magnet_small
#
# Environment: OUT (output dir, default quickstart_out), MAGNET_VENV (an installed environment to use as is),
# PYTHON (interpreter for the venv, default python3), STEPS (training steps, default 3000), CLIPS (corpus clips,
# default 256).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-quickstart_out}
STEPS=${STEPS:-3000}
CLIPS=${CLIPS:-256}
TIMBRES=sawtooth,sine  # the two timbres the prompts ask for (bright / soft)
EVAL_CLIPS=16
SECONDS_PER_CLIP=4
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # absolute: the trained model's config.json names its text encoder and codec by path
VENV=${MAGNET_VENV:-$OUT/venv}
start_all=$(date +%s)
timings=()

# A few hundred CPU steps, not a million: a higher learning rate without weight decay, an EMA that follows the
# weights (decay 0.9 every step; the default, 0.99 every 10 steps, is a near-uniform average over a run this short,
# its first steps included), every word of a description kept (no word dropout) and 20 % unconditional rows for CFG.
SHORT_RUN=(--config.optim.lr=5e-3 --config.optim.weight_decay=0.0 --config.optim.ema_every=1 --config.optim.ema_decay=0.9
  --config.conditioner.word_dropout=0.0 --config.conditioner.cfg_dropout=0.2)
# A tiny model's distributions are flat: sample them at temperature 1 (not 3) with a constant CFG of 3 (not 10 -> 1)
SAMPLING=(--config.generate.temperature=1.0 --config.generate.max_cfg=3.0 --config.generate.min_cfg=3.0)

step() {  # step NAME COMMAND...: runs COMMAND, records its wall time
  local name=$1 t0
  shift
  echo "== $name"
  t0=$(date +%s)
  "$@"
  timings+=("$(printf '%-34s %5d s' "$name" $(( $(date +%s) - t0 )))")
}

install() {  # the runtime install of tests/run.sh (no test extras); skipped for MAGNET_VENV
  local stamp
  stamp="$VENV/.quickstart-installed-$(sha1sum constraints.txt setup.py | sha1sum | cut -c1-12)"
  if [ -z "${MAGNET_VENV:-}" ] && [ ! -f "$stamp" ]; then
    "${PYTHON:-python3}" -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check -c constraints.txt -e .
    touch "$stamp"
  fi
}

py() { "$VENV/bin/python" "$@"; }

corpus() {  # training clips (seed 0) and held-out clips (seed 1) for the eval split
  py -m data_pipelines.synthetic_corpus --output="$OUT/corpus" --num_clips="$CLIPS" --seconds=$SECONDS_PER_CLIP --seed=0 \
    --timbres=$TIMBRES
  py -m data_pipelines.synthetic_corpus --output="$OUT/corpus_eval" --num_clips="$EVAL_CLIPS" \
    --seconds=$SECONDS_PER_CLIP --seed=1 --timbres=$TIMBRES
}

encode() {
  py -m data_pipelines.encode_audio --input="$OUT/corpus" --output="$OUT/codes" --codec="$OUT/assets/codec" \
    --segment_seconds=$SECONDS_PER_CLIP --chunk_seconds=$SECONDS_PER_CLIP
  py -m data_pipelines.encode_audio --input="$OUT/corpus_eval" --output="$OUT/codes_eval" \
    --codec="$OUT/assets/codec" --segment_seconds=$SECONDS_PER_CLIP --chunk_seconds=$SECONDS_PER_CLIP
}

step "environment ($VENV)" install
step "synthetic corpus ($CLIPS + $EVAL_CLIPS clips)" corpus
step "tiny T5 + trained codec (local)" py -m data_pipelines.make_tiny_assets --corpus="$OUT/corpus" \
  --output="$OUT/assets" --codec=data_pipelines/tiny_codec --untrained_lm_seconds=$SECONDS_PER_CLIP
step "encode corpus to codes" encode
step "train tiny MAGNeT ($STEPS steps)" py -m magnet_jax.train \
  --config=configs/magnet.py:size=tiny,duration=$SECONDS_PER_CLIP --workdir="$OUT/workdir" \
  --config.data.train_files="$OUT/codes/*.array_record" --config.data.eval_files="$OUT/codes_eval/*.array_record" \
  --config.train.num_steps="$STEPS" --config.train.eval_every=$(( STEPS / 3 > 0 ? STEPS / 3 : 1 )) \
  --config.train.log_every=$(( STEPS / 10 > 0 ? STEPS / 10 : 1 )) --config.optim.warmup_steps=$(( STEPS / 10 )) \
  --config.checkpoint.every_steps=$(( STEPS / 3 > 0 ? STEPS / 3 : 1 )) \
  "${SHORT_RUN[@]}" --config.conditioner.t5="$OUT/assets/t5" --config.codec.source="$OUT/assets/codec"
step "prompts" py -m data_pipelines.quickstart_report --mode=prompts --output="$OUT" --seconds=$SECONDS_PER_CLIP
step "generate" py -m magnet_jax.generate \
  --config=configs/generate.py:source="$OUT/workdir",duration=$SECONDS_PER_CLIP --config.batch_size=4 "${SAMPLING[@]}" \
  --prompts="$OUT/prompts.jsonl" --output_dir="$OUT/samples"
step "generate (untrained model, for comparison)" py -m magnet_jax.generate \
  --config=configs/generate.py:source="$OUT/assets/untrained_lm",duration=$SECONDS_PER_CLIP --config.batch_size=4 \
  "${SAMPLING[@]}" \
  --prompts="$OUT/prompts.jsonl" --output_dir="$OUT/samples_untrained"
step "objective check" py -m data_pipelines.quickstart_report --mode=check --output="$OUT"

echo
echo "== timings"
printf '%s\n' "${timings[@]}"
printf '%-34s %5d s\n' "total" $(( $(date +%s) - start_all ))
echo
echo "Generated $(ls "$OUT"/samples/*.wav | wc -l) WAV files (32 kHz mono) in $OUT/samples:"
ls "$OUT"/samples/*.wav
echo "Their prompts, seeds, parameters and timings: $OUT/samples/manifest.jsonl"
