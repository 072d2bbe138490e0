#!/usr/bin/env bash
# The GPU path in one call (about 5 minutes on one GPU): every GPU test, then the GPU scale bench.
#   bash benchmarks/gpu_check.sh            # prints the tests' summary line and the bench's table
# Fails with one line (exit 2) when no GPU or no faiss GPU build is present. Run from the repository root
# (or anywhere: it changes to it); PYTHON overrides the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TQDM_DISABLE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" - <<'PYEOF'
import sys
try:
    import torch, faiss
except ImportError as err:
    print(f"gpu_check: cannot import torch and faiss ({err}); set PYTHON to the project's interpreter", file=sys.stderr)
    sys.exit(2)
ok = torch.cuda.is_available() and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
if not ok:
    why = "torch sees no CUDA device" if not torch.cuda.is_available() else "faiss has no GPU build (faiss-gpu)"
    print(f"gpu_check: no usable GPU: {why}; expected one CUDA GPU with faiss-gpu installed", file=sys.stderr)
    sys.exit(2)
print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, faiss {faiss.__version__}, "
      f"{faiss.get_num_gpus()} faiss GPU(s)")
PYEOF
then
    exit 2
fi

start=$SECONDS
echo "== GPU tests (pytest -m gpu) =="
tests_rc=0
timeout 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs tests 2>&1 | tail -n 15 || tests_rc=$?
echo "== GPU scale bench (1M codes) =="
bench_rc=0
timeout 240 "$PY" benchmarks/bench_gpu.py "$@" || bench_rc=$?
echo "== gpu_check: tests exit ${tests_rc}, bench exit ${bench_rc}, $((SECONDS - start)) s =="
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
