#!/usr/bin/env bash
# Set up (or reuse) a virtual environment, then run the main job or the tests.
#   bash run.sh main [train_naics.py options]   # train NAICS 2022 embeddings (CPU, about 10 min)
#   bash run.sh test [pytest options]           # the test suite
set -euo pipefail
cd "$(dirname "$0")"
VENV="${NAICS_HNM_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
stamp="$VENV/.naics_hnm-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    python -m pip install -q --upgrade pip
    # the CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build
    python -m pip install -q "torch==2.13.0"
    # everything: the training side (train) and the test tools, sentence-transformers included (dev)
    python -m pip install -q -e ".[train,dev]"
    touch "$stamp"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
command="${1:-}"
[ $# -gt 0 ] && shift
case "$command" in
    main) exec python examples/train_naics.py --output outputs/naics "$@" ;;
    test) exec python -m pytest -q "$@" ;;
    *) echo "usage: bash run.sh main|test [options]" >&2; exit 2 ;;
esac
