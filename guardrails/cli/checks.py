"""``guardrails validate`` without loading weights: SAE widths and hidden sizes from file headers
(safetensors headers, ``cfg.json``), layer counts from the model's config, probe shapes from headers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

from guardrails.core.policy import LinearDetector, Policy, parts_where
from guardrails.core.yaml_io import shipped_twin_hint


class SAEHeader(NamedTuple):
    """What an SAE file says about its shape (None where the header does not say)."""

    d_sae: int | None
    """Number of latents."""
    d_model: int | None
    """Width of the residual stream it reads."""


_BIAS = ("b_enc", "encoder.bias")
_ENC = ("W_enc", "encoder.weight")


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors header (8-byte length + JSON); no tensor data is read."""
    with path.open("rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if not 0 < n < 100_000_000:
            raise ValueError(f"{path}: not a safetensors file (header length {n})")
        header = json.loads(fh.read(n))
    return {k: list(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def sae_header(path: Path) -> SAEHeader:
    """Shape of the SAE at ``path`` (a folder with ``cfg.json`` / ``*.safetensors``, or a file)."""
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path] if path.suffix == ".safetensors" else []
    for f in files:
        shapes = _safetensors_shapes(f)
        d_sae = next((s[0] for k, s in shapes.items() if k in _BIAS and len(s) == 1), None)
        enc = next((s for k, s in shapes.items() if k in _ENC and len(s) == 2), None)
        if d_sae is not None or enc is not None:
            d_model = None
            if enc is not None:
                d_model = enc[1] if d_sae is None or enc[0] == d_sae else enc[0]
                d_sae = d_sae if d_sae is not None else enc[0]
            return SAEHeader(d_sae, d_model)
    cfg = path / "cfg.json" if path.is_dir() else None
    if cfg is not None and cfg.is_file():
        data = json.loads(cfg.read_text(encoding="utf-8"))
        d_sae = data.get("d_sae") or data.get("num_latents")
        d_model = data.get("d_model") or data.get("d_in")
        return SAEHeader(int(d_sae) if d_sae else None, int(d_model) if d_model else None)
    return SAEHeader(None, None)  # e.g. a Qwen-Scope .pt pickle: only --deep can read it


def model_config(model: str | None) -> Any:
    """The model's config (no weights): the bundled model's, or a Hugging Face id's from the local cache."""
    from transformers import AutoConfig

    from guardrails.serving.models import BUNDLED_MODEL, bundled_model_path

    source = str(bundled_model_path()) if model in (None, BUNDLED_MODEL) else str(model)
    return AutoConfig.from_pretrained(source)


def _resolve_sae(policy: Policy, ref: str) -> Path:
    if ref.startswith("bundled"):
        from guardrails.sae.loaders import resolve_bundled

        return Path(resolve_bundled(ref))
    return Path(policy.resolve(ref))


def check_policy(policy: Policy) -> tuple[list[str], list[str]]:
    """``(problems, notes)``: files missing, feature ids past an SAE's width, layers past the model, shapes
    that disagree with the model's hidden size; notes say what could not be checked."""
    problems: list[str] = []
    notes: list[str] = []
    widths: dict[str, int] = {}
    hidden: int | None = None
    n_layers: int | None = None
    try:
        cfg = model_config(policy.model)
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        n_layers, hidden = int(text.num_hidden_layers), int(text.hidden_size)
    except Exception as exc:  # no config offline: say so, check the rest
        notes.append(f"model {policy.model or 'bundled'!r}: config not available ({type(exc).__name__}); "
                     "layers not checked")
    for sid, spec in policy.saes.items():
        if spec.path.startswith("hf://"):
            notes.append(f"saes.{sid}.path: {spec.path} is on the hub; shape checked with --deep")
            continue
        try:
            path = _resolve_sae(policy, spec.path)
        except Exception as exc:
            problems.append(f"saes.{sid}.path: {spec.path!r}: {exc}")
            continue
        if not path.exists():
            problems.append(f"saes.{sid}.path: {str(path)!r} not found")
            continue
        try:
            head = sae_header(path)
        except (OSError, ValueError) as exc:
            problems.append(f"saes.{sid}.path: cannot read the header of {str(path)!r}: {exc}")
            continue
        if head.d_sae is None:
            notes.append(f"saes.{sid}: width not in the file header ({path.name}); feature ids checked with --deep")
        else:
            widths[sid] = head.d_sae
        if head.d_model is not None and hidden is not None and head.d_model != hidden:
            problems.append(f"saes.{sid}: reads d_model={head.d_model} but the model's hidden size is {hidden}")
    for i, rule in enumerate(policy.rules):
        for where, det in parts_where(f"rules[{i}].detector", rule.detector):
            if not isinstance(det, LinearDetector):
                continue
            path = Path(policy.resolve(det.weights))
            if not path.is_file():
                problems.append(f"{where}.weights: {str(path)!r} not found{shipped_twin_hint(path)}")
                continue
            shape = _safetensors_shapes(path).get("weight")
            if hidden is not None and shape != [hidden]:
                problems.append(f"{where}.weights: 'weight' has shape {shape}, the model needs [{hidden}]")
        if rule.categories is not None:  # the head's shape here; its labels and actions when loaded (--deep)
            path = Path(policy.resolve(rule.categories.weights))
            if not path.is_file():
                problems.append(f"rules[{i}].categories.weights: {str(path)!r} not found{shipped_twin_hint(path)}")
                continue
            shape = _safetensors_shapes(path).get("weight")
            if hidden is not None and (shape is None or len(shape) != 2 or shape[1] != hidden):
                problems.append(f"rules[{i}].categories.weights: 'weight' has shape {shape}, the model needs "
                                f"[n_categories, {hidden}]")
    try:
        policy.check_against(n_layers if n_layers is not None else 1 << 30, widths)
    except Exception as exc:
        problems.append(str(exc))
    return problems, notes
