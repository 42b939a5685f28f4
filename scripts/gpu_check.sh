#!/usr/bin/env bash
# The GPU check (issue #10 item 7): one command, <= 8 minutes on one H100/H200, no downloads.
#   bash scripts/gpu_check.sh                 # every section; table in bench/results_gpu.md, logs in $OUT or bench/gpu/out
#   bash scripts/gpu_check.sh --cpu-smoke     # the same code paths, tiny, on the CPU (about 2 minutes)
#   bash scripts/gpu_check.sh --only train,mfu --budget 300
# Sections, their timeouts and what they report: scripts/gpu_check.py --help (and nbs/A3_perf.ipynb).
# Python: $PYTHON if set, else python3 (the GPU image's /opt/torch/.venv/bin/python3 when it is there and python3
# has no torch). The package need not be installed: the repository goes on PYTHONPATH.
cd "$(dirname "$0")/.." || exit 2
PY="${PYTHON:-python3}"
if [ -z "${PYTHON:-}" ] && ! "$PY" -c 'import torch' 2>/dev/null && [ -x /opt/torch/.venv/bin/python3 ]; then
    PY=/opt/torch/.venv/bin/python3
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" scripts/gpu_check.py "$@"
