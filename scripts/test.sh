#!/usr/bin/env bash
# Install with the dev extras, then lint, type-check and run the whole test suite (model tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh "[dev]"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ruff check guardrails tests benchmarks scripts calibration
mypy
set +e
python -m pytest -q -p no:cacheprovider --durations=15
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi
exit "$rc"
