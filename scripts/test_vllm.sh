#!/usr/bin/env bash
# Run the vLLM tests (tests/test_vllm.py, then the server over vLLM: tests/test_vllm_server.py, each in a
# process of its own: one vLLM engine per process) with the vLLM venv's python; install the venv if missing.
#   bash scripts/test_vllm.sh              # venv at $GUARDRAILS_VLLM_VENV or /opt/venvs/vllm
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${GUARDRAILS_VLLM_VENV:-/opt/venvs/vllm}"
if ! "$VENV/bin/python" -c "import vllm, pytest_timeout" >/dev/null 2>&1; then
  bash scripts/install_vllm.sh
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
VLLM_CACHE_ROOT="$(mktemp -d)"
export VLLM_CACHE_ROOT
trap 'rm -rf "$VLLM_CACHE_ROOT"' EXIT
status=0
for file in tests/test_vllm.py tests/test_vllm_server.py; do
  set +e
  "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$file" -rs "$@"
  rc=$?
  set -e
  if [ "$rc" -eq 5 ]; then echo "pytest collected no vLLM tests in $file: failing"; rc=1; fi
  if [ "$rc" -ne 0 ]; then status=$rc; fi
done
# every vLLM test must have run: a skip here means vLLM did not import in its own venv
exit "$status"
