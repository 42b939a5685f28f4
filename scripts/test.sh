#!/usr/bin/env bash
# The project's test command (README, CI): export/clean sync, the notebooks, then pytest (its summary closes the run).
set -euo pipefail
cd "$(dirname "$0")/.."
python scripts/check_sync.py
python scripts/test_nbs.py
python -m pytest tests -q -p no:cacheprovider "$@"
