#!/usr/bin/env bash
# Installs everything the tests need into ./.venv (pinned by constraints.txt), checks formatting and lint (ruff),
# and runs the test suite.
# Usage: bash tests/run.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MAGNET_VENV:-.venv}
stamp="$VENV/.installed-$(sha1sum constraints.txt setup.py | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -c constraints.txt -e ".[test]"
  # audiocraft is the MAGNeT reference for parity tests; its declared deps (torch==2.1, xformers...) are not wanted.
  # The references are installed without their declared dependencies: audiocraft (MAGNeT; torch==2.1, xformers...),
  # torchvggish and hear21passt (FAD / KL embeddings; resampy, timm, torchaudio have no build for torch 2.13),
  # laion_clap (CLAP; pins numpy<2, pulls torchvision/wandb/webdataset). references/audiocraft_stubs.py stands in.
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps -c constraints.txt audiocraft torchvggish \
    hear21passt laion_clap
  touch "$stamp"
fi
# formatting and lint first: they take seconds and say exactly what to fix (`ruff format .`, `ruff check --fix .`)
"$VENV/bin/ruff" format --check --quiet .
"$VENV/bin/ruff" check --quiet .
exec "$VENV/bin/python" -m pytest tests -q -p no:cacheprovider "$@"
