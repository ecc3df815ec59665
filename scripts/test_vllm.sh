#!/usr/bin/env bash
# Run the vLLM tests (tests/test_vllm.py) with the vLLM venv's python; install the venv first if missing.
#   bash scripts/test_vllm.sh              # venv at $GUARDRAILS_VLLM_VENV or /opt/venvs/vllm
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${GUARDRAILS_VLLM_VENV:-/opt/venvs/vllm}"
if ! "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
  bash scripts/install_vllm.sh
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
VLLM_CACHE_ROOT="$(mktemp -d)"
export VLLM_CACHE_ROOT
trap 'rm -rf "$VLLM_CACHE_ROOT"' EXIT
set +e
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_vllm.py -rs "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no vLLM tests: failing"; exit 1; fi
# every vLLM test must have run: a skip here means vLLM did not import in its own venv
exit "$rc"
