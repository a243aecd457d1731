#!/usr/bin/env bash
# Installs everything the tests need into ./.venv (pinned by constraints.txt) and runs the test suite.
# Usage: bash tests/run.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MAGNET_VENV:-.venv}
stamp="$VENV/.installed-$(sha1sum constraints.txt setup.py | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -c constraints.txt -e ".[test]"
  # audiocraft is the MAGNeT reference for parity tests; its declared deps (torch==2.1, xformers...) are not wanted.
  # laion_clap is the CLAP reference; it pins numpy<2 and pulls torchvision/wandb/webdataset, which are not wanted.
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps -c constraints.txt audiocraft laion_clap
  touch "$stamp"
fi
exec "$VENV/bin/python" -m pytest tests -q -p no:cacheprovider "$@"
