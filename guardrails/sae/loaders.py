"""Registry of SAE file formats, with detection, and the optional Hugging Face hub download.

Formats (weights are converted to the layout of :class:`guardrails.sae.model.SAE`):

- ``qwen-scope``: ``layer{n}.sae.pt``, a torch dict of ``W_enc`` [d_sae, d_model], ``W_dec``
  [d_model, d_sae], ``b_enc`` [d_sae], ``b_dec`` [d_model]; TopK with no ReLU and no ``b_dec``
  subtraction. ``k`` is not in the file: pass it (Qwen-Scope repos are ``...-L0_50`` / ``-L0_100``).
- ``saelens``: ``cfg.json`` + ``sae_weights.safetensors`` with ``W_enc`` [d_in, d_sae], ``W_dec``
  [d_sae, d_in]; architecture ``standard`` (ReLU), ``jumprelu`` or ``topk``.
- ``sparsify``: ``cfg.json`` + ``sae.safetensors`` with ``encoder.weight`` [d_sae, d_in],
  ``encoder.bias``, ``W_dec`` [d_sae, d_in], ``b_dec``; ReLU then TopK, ``b_dec`` subtracted first.
- ``guardrails``: our own ``cfg.json`` (``"format": "sae-guardrails"``) + ``sae.safetensors``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from guardrails.sae.model import SAE, SAEConfig, SAEError, parse_dtype

logger = logging.getLogger(__name__)

BUNDLED_SAE_DIR = Path(__file__).resolve().parents[1] / "assets" / "sae"
BUNDLED_SAES = {"layer15": "smollm2-135m-l15"}
"""Short names of the SAEs shipped in the package, usable as ``bundled:<name>``."""


@dataclass(frozen=True)
class SAEFormat:
    """A file format: a detector and a loader returning an SAE in float32 on the CPU."""

    name: str
    description: str
    detect: Callable[[Path, int | None], bool]
    load: Callable[..., SAE]


_FORMATS: dict[str, SAEFormat] = {}


def register_format(fmt: SAEFormat) -> None:
    """Add a format to the registry; a second format with the same name is refused."""
    if fmt.name in _FORMATS:
        raise ValueError(f"SAE format {fmt.name!r} is already registered")
    _FORMATS[fmt.name] = fmt


def known_formats() -> list[str]:
    return list(_FORMATS)


# -- helpers ---------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SAEError(f"{path}: cannot read SAE config: {exc}") from exc
    if not isinstance(data, dict):
        raise SAEError(f"{path}: SAE config must be a JSON object, got {type(data).__name__}")
    return data


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise SAEError(f"{path}: cannot read safetensors file: {exc}") from exc


def _need(tensors: dict[str, Tensor], names: tuple[str, ...], path: Path) -> None:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise SAEError(f"{path}: missing tensors {missing}; found {sorted(tensors)}; expected {list(names)}")


def _qwen_file(path: Path, layer: int | None) -> Path | None:
    if path.is_file() and path.name.endswith(".pt"):
        return path
    if path.is_dir() and layer is not None and (path / f"layer{layer}.sae.pt").is_file():
        return path / f"layer{layer}.sae.pt"
    return None


def _layer_from_name(path: Path) -> int | None:
    m = re.fullmatch(r"layer(\d+)\.sae\.pt", path.name)
    return int(m.group(1)) if m else None


# -- qwen-scope --------------------------------------------------------------------------------


def _load_qwen_scope(path: Path, *, layer: int | None = None, k: int | None = None, **_: Any) -> SAE:
    file = _qwen_file(path, layer)
    if file is None:
        listing = sorted(p.name for p in path.glob("layer*.sae.pt")) if path.is_dir() else []
        if layer is None:
            raise SAEError(f"{path}: a folder of Qwen-Scope files needs layer=; files here: {listing[:8]}")
        raise SAEError(f"{path}: no layer{layer}.sae.pt for layer={layer}; files here: {listing[:8]}")
    try:
        data = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # pickle errors come in many types; none may run code (weights_only)
        raise SAEError(
            f"{file}: not a loadable Qwen-Scope .pt file (loaded with weights_only=True): {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(data, dict):
        raise SAEError(f"{file}: expected a dict of tensors, got {type(data).__name__}")
    _need(data, ("W_enc", "W_dec", "b_enc", "b_dec"), file)
    if not all(isinstance(data[n], Tensor) for n in ("W_enc", "W_dec", "b_enc", "b_dec")):
        raise SAEError(f"{file}: W_enc, W_dec, b_enc, b_dec must be tensors")
    W_enc, W_dec = data["W_enc"], data["W_dec"]
    if W_enc.ndim != 2 or W_dec.ndim != 2:
        raise SAEError(f"{file}: W_enc {tuple(W_enc.shape)} and W_dec {tuple(W_dec.shape)} must be 2-D")
    d_sae, d_model = W_enc.shape
    if tuple(W_dec.shape) != (d_model, d_sae):
        raise SAEError(
            f"{file}: W_dec has shape {tuple(W_dec.shape)}; Qwen-Scope layout expects [d_model, d_sae] = "
            f"{(d_model, d_sae)} given W_enc {tuple(W_enc.shape)}"
        )
    if k is None:
        raise SAEError(f"{file}: Qwen-Scope files do not store k; pass k= (50 or 100, from the repo name L0_50/L0_100)")
    cfg = SAEConfig(
        d_model=d_model,
        d_sae=d_sae,
        architecture="topk",
        k=k,
        layer=layer if layer is not None else _layer_from_name(file),
        source_format="qwen-scope",
    )
    return SAE(cfg, W_enc.float(), data["b_enc"].float(), W_dec.T.float(), data["b_dec"].float())


# -- saelens -------------------------------------------------------------------------------------


def _load_saelens(path: Path, *, k: int | None = None, layer: int | None = None, **_: Any) -> SAE:
    cfg_path = path / "cfg.json"
    cfg = _read_json(cfg_path)
    raw_meta = cfg.get("meta")
    meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}  # SAELens >= 6 nests these
    t = _read_safetensors(path / "sae_weights.safetensors")
    _need(t, ("W_enc", "W_dec", "b_enc", "b_dec"), path / "sae_weights.safetensors")
    arch = str(cfg.get("architecture", "standard"))
    act_fn = str(cfg.get("activation_fn_str") or cfg.get("activation_fn") or "relu")
    if arch == "standard" and act_fn == "topk":  # SAELens 5: a standard SAE with a TopK activation
        arch = "topk"
    elif arch == "standard" and act_fn != "relu":
        raise SAEError(f"{cfg_path}: unsupported activation_fn_str {act_fn!r} for a standard SAE; valid: relu, topk")
    mapping = {"standard": "relu", "relu": "relu", "jumprelu": "jumprelu", "topk": "topk"}
    if arch not in mapping:
        raise SAEError(f"{cfg_path}: unsupported SAELens architecture {arch!r}; valid: {', '.join(mapping)}")
    norm = cfg.get("normalize_activations") or "none"
    if norm != "none":
        raise SAEError(
            f"{cfg_path}: normalize_activations={norm!r} is not supported (it changes the encoder input); "
            "valid: none (fold the scaling into the weights first)"
        )
    W_enc = t["W_enc"]
    if W_enc.ndim != 2:
        weights = path / "sae_weights.safetensors"
        raise SAEError(f"{weights}: W_enc has shape {tuple(W_enc.shape)}; expected [d_in, d_sae]")
    d_model, d_sae = W_enc.shape
    for key, size in (("d_in", d_model), ("d_sae", d_sae)):
        if key in cfg and int(cfg[key]) != size:
            raise SAEError(
                f"{cfg_path}: {key}={cfg[key]} but W_enc has shape {tuple(W_enc.shape)} (SAELens layout [d_in, d_sae])"
            )
    if arch == "topk":
        k = k or cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
        if not k:
            raise SAEError(f"{cfg_path}: a topk SAE without 'k' in its config; pass k=")
    hook_layer = cfg.get("hook_layer", meta.get("hook_layer"))
    conf = SAEConfig(
        d_model=d_model,
        d_sae=d_sae,
        architecture=mapping[arch],  # type: ignore[arg-type]
        k=int(k) if k else None,
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),  # SAELens' default
        relu_after_topk=arch == "topk",
        layer=layer if layer is not None else hook_layer,
        model=cfg.get("model_name", meta.get("model_name")),
        source_format="saelens",
    )
    threshold = t.get("threshold")
    return SAE(conf, W_enc.T.float(), t["b_enc"].float(), t["W_dec"].float(), t["b_dec"].float(),
               threshold.float() if threshold is not None else None)


# -- sparsify ----------------------------------------------------------------------------------


def _load_sparsify(path: Path, *, k: int | None = None, layer: int | None = None, **_: Any) -> SAE:
    cfg_path = path / "cfg.json"
    cfg = _read_json(cfg_path)
    t = _read_safetensors(path / "sae.safetensors")
    _need(t, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), path / "sae.safetensors")
    activation = str(cfg.get("activation", "topk"))
    if activation != "topk":
        raise SAEError(f"{cfg_path}: unsupported sparsify activation {activation!r}; valid: topk")
    if cfg.get("skip_connection"):
        logger.warning("%s: the skip connection (W_skip) is ignored: encode is exact, decode omits x @ W_skip.T", path)
    enc = t["encoder.weight"]
    if enc.ndim != 2:
        weights = path / "sae.safetensors"
        raise SAEError(f"{weights}: encoder.weight has shape {tuple(enc.shape)}; expected [d_sae, d_in]")
    d_sae, d_model = enc.shape
    if "d_in" in cfg and int(cfg["d_in"]) != d_model:
        raise SAEError(f"{cfg_path}: d_in={cfg['d_in']} but encoder.weight has shape {tuple(enc.shape)} [d_sae, d_in]")
    k = k or cfg.get("k")
    if not k:
        raise SAEError(f"{cfg_path}: no 'k' in the sparsify config; pass k=")
    conf = SAEConfig(
        d_model=d_model,
        d_sae=d_sae,
        architecture="topk",
        k=int(k),
        apply_b_dec_to_input=not cfg.get("transcode", False),  # sparsify subtracts b_dec unless transcoding
        relu_after_topk=True,
        layer=layer,
        source_format="sparsify",
    )
    return SAE(conf, enc.float(), t["encoder.bias"].float(), t["W_dec"].float(), t["b_dec"].float())


# -- ours --------------------------------------------------------------------------------------------


def _load_guardrails(path: Path, *, k: int | None = None, layer: int | None = None, **_: Any) -> SAE:
    raw = _read_json(path / "cfg.json")
    known = {f.name for f in fields(SAEConfig)}
    kwargs = {key: value for key, value in raw.items() if key in known}
    if k is not None:
        kwargs["k"] = k
    if layer is not None:
        kwargs["layer"] = layer
    try:
        conf = SAEConfig(**kwargs)
    except TypeError as exc:
        raise SAEError(f"{path / 'cfg.json'}: {exc}") from exc
    t = _read_safetensors(path / "sae.safetensors")
    _need(t, ("W_enc", "W_dec", "b_enc", "b_dec"), path / "sae.safetensors")
    thr = t.get("threshold")
    return SAE(conf, t["W_enc"].float(), t["b_enc"].float(), t["W_dec"].float(), t["b_dec"].float(),
               thr.float() if thr is not None else None)


def _is_folder_with(path: Path, cfg_key: str | None, weights: str) -> bool:
    if not (path.is_dir() and (path / "cfg.json").is_file() and (path / weights).is_file()):
        return False
    if cfg_key is None:
        return True
    try:
        return cfg_key in json.loads((path / "cfg.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False


def _is_ours(path: Path, _layer: int | None) -> bool:
    return _is_folder_with(path, "format", "sae.safetensors") and (
        json.loads((path / "cfg.json").read_text()).get("format") == "sae-guardrails"
    )


register_format(SAEFormat("guardrails", "cfg.json + sae.safetensors written by SAE.save()", _is_ours, _load_guardrails))
register_format(SAEFormat(
    "qwen-scope", "layer{n}.sae.pt torch dict (a file, or a folder plus layer=)",
    lambda p, layer: _qwen_file(p, layer) is not None, _load_qwen_scope,
))
register_format(SAEFormat(
    "saelens", "cfg.json + sae_weights.safetensors", lambda p, _l: _is_folder_with(p, None, "sae_weights.safetensors"),
    _load_saelens,
))
register_format(SAEFormat(
    "sparsify", "cfg.json + sae.safetensors with encoder.weight (EleutherAI)",
    lambda p, layer: _is_folder_with(p, None, "sae.safetensors") and not _is_ours(p, layer), _load_sparsify,
))


# -- entry points ------------------------------------------------------------------------------


def resolve_bundled(name: str) -> Path:
    """Folder of a bundled SAE from ``bundled`` / ``bundled:layer15`` / ``bundled:smollm2-135m-l15``."""
    key = name.split(":", 1)[1] if ":" in name else "layer15"
    folder = BUNDLED_SAES.get(key, key)
    path = BUNDLED_SAE_DIR / folder
    if not (path / "cfg.json").is_file():
        valid = [f"bundled:{n}" for n in BUNDLED_SAES]
        raise SAEError(f"unknown bundled SAE {name!r}; valid: {', '.join(valid)}")
    return path


def load_sae(
    path: str | os.PathLike[str],
    *,
    layer: int | None = None,
    k: int | None = None,
    format: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    **kwargs: Any,
) -> SAE:
    """Load an SAE from a file, folder, ``bundled[:name]`` or ``hf://org/repo`` (see :meth:`SAE.load`)."""
    text = str(path)
    if text == "bundled" or text.startswith("bundled:"):
        p = resolve_bundled(text)
    elif text.startswith("hf://"):
        if layer is None:
            raise SAEError(f"{text}: a hub SAE needs layer= (the file is layer{{n}}.sae.pt)")
        return load_from_hub(text[5:], layer=layer, k=k, dtype=dtype, device=device)
    else:
        p = Path(text).expanduser()
    if not p.exists():
        raise SAEError(f"SAE path {str(p)!r} does not exist; give a file, folder, 'bundled' or 'hf://org/repo'")
    if format is not None:
        if format not in _FORMATS:
            raise SAEError(f"unknown SAE format {format!r}; valid: {', '.join(_FORMATS)}")
        fmt = _FORMATS[format]
    else:
        found = [f for f in _FORMATS.values() if f.detect(p, layer)]
        if not found and p.is_dir() and any(p.glob("layer*.sae.pt")):
            found = [_FORMATS["qwen-scope"]]  # a Qwen-Scope folder: its loader names the layer files
        if not found:
            described = "; ".join(f"{f.name}: {f.description}" for f in _FORMATS.values())
            raise SAEError(f"{p}: unrecognised SAE format; known formats: {described}")
        fmt = found[0]
    try:
        try:
            sae = fmt.load(p, layer=layer, k=k, **kwargs)
        except SAEError:
            raise
        except (ValueError, TypeError, KeyError, OverflowError, AttributeError) as exc:
            raise SAEError(f"{p}: invalid {fmt.name} SAE ({fmt.description}): {type(exc).__name__}: {exc}") from exc
    except SAEError as exc:
        if str(p) in str(exc):
            raise
        raise SAEError(f"{p} ({fmt.name} format): {exc}") from exc
    for name, tensor in sae.tensors().items():
        if not torch.isfinite(tensor).all():
            raise SAEError(f"{p}: tensor {name} contains NaN or inf values")
    return sae.to_dtype(parse_dtype(dtype, where="SAE dtype"), device)


def load_from_hub(
    repo_id: str,
    *,
    layer: int,
    k: int | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    revision: str | None = None,
) -> SAE:
    """Download one Qwen-Scope layer file (``layer{layer}.sae.pt``) with huggingface_hub and load it.

    ``k`` defaults to the ``L0_{k}`` suffix of the repo name. Needs network access (or a warm cache).
    """
    from huggingface_hub import hf_hub_download

    if k is None:
        m = re.search(r"L0_(\d+)", repo_id)
        if m is None:
            raise SAEError(f"{repo_id}: pass k= (the repo name has no L0_<k> suffix)")
        k = int(m.group(1))
    file = hf_hub_download(repo_id, f"layer{layer}.sae.pt", revision=revision)
    return load_sae(file, layer=layer, k=k, format="qwen-scope", dtype=dtype, device=device)
