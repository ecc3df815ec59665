"""Sparse autoencoders: TopK (Qwen-Scope), JumpReLU (Gemma Scope) and ReLU (SAELens standard).

Weights are held in one layout whatever the file format: ``W_enc`` ``[d_sae, d_model]`` (a row per
feature, as Qwen-Scope stores it), ``b_enc`` ``[d_sae]``, ``W_dec`` ``[d_sae, d_model]`` (a row per
feature: its decoder direction), ``b_dec`` ``[d_model]``.

Encode, for input ``x``::

    pre  = (x - b_dec if apply_b_dec_to_input else x) @ W_enc.T + b_enc
    topk:     keep the k largest of pre, zero the rest (Qwen-Scope: no ReLU); relu_after_topk clamps them at 0
    jumprelu: relu(pre) * (pre > threshold)   (Gemma Scope, SAELens)
    relu:     max(pre, 0)

Decode: ``acts @ W_dec + b_dec``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from guardrails.core.errors import GuardrailsError

Architecture = Literal["topk", "jumprelu", "relu"]
ARCHITECTURES: tuple[str, ...] = ("topk", "jumprelu", "relu")


_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype | None, *, where: str = "dtype") -> torch.dtype | None:
    """Turn ``"bf16"``, ``"float32"``... or a torch dtype into a torch dtype (``None`` stays ``None``)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown {where} {dtype!r}; valid: {', '.join(sorted(_DTYPES))}") from None


class SAEError(GuardrailsError, ValueError):
    """An SAE file or argument is invalid; the message names the file, tensor or argument."""


class EncodeOutput(NamedTuple):
    """Sparse result of an encode."""

    values: Tensor
    """Activations of the active features, ``[..., n_active]`` (TopK: ``n_active == k``)."""
    indices: Tensor
    """Feature ids of ``values``, ``[..., n_active]``, int64."""


@dataclass(frozen=True)
class SAEConfig:
    """Shape and activation rule of an SAE, saved as ``cfg.json`` in our own format."""

    d_model: int
    """Width of the residual stream the SAE reads."""
    d_sae: int
    """Number of features (latents)."""
    architecture: Architecture = "topk"
    """Activation rule: ``topk``, ``jumprelu`` or ``relu``."""
    k: int | None = None
    """Active features per token for ``topk``."""
    apply_b_dec_to_input: bool = False
    """Subtract ``b_dec`` from the input before encoding (SAELens, sparsify); Qwen-Scope does not."""
    relu_after_topk: bool = False
    """Clamp the kept TopK values at zero (sparsify); Qwen-Scope keeps them as they are."""
    layer: int | None = None
    """Decoder block whose output (residual stream after block ``layer``) the SAE reads."""
    model: str | None = None
    """Model the SAE was trained on, informational."""
    source_format: str = "guardrails"
    """Format the SAE was loaded from."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form training record (data, steps, FVU...)."""

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise SAEError(f"unknown SAE architecture {self.architecture!r}; valid: {', '.join(ARCHITECTURES)}")
        if self.d_model <= 0 or self.d_sae <= 0:
            raise SAEError(f"SAE sizes must be positive, got d_model={self.d_model}, d_sae={self.d_sae}")
        if self.architecture == "topk":
            if self.k is None:
                raise SAEError("a topk SAE needs k (pass k=..., e.g. SAE.load(path, k=50))")
            if not 0 < self.k <= self.d_sae:
                raise SAEError(f"k={self.k} is out of range; valid: 1..{self.d_sae} (d_sae)")


class SAE(nn.Module):
    """A sparse autoencoder over one residual-stream layer."""

    def __init__(
        self,
        cfg: SAEConfig,
        W_enc: Tensor,
        b_enc: Tensor,
        W_dec: Tensor,
        b_dec: Tensor,
        threshold: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        expected = {
            "W_enc": (cfg.d_sae, cfg.d_model),
            "b_enc": (cfg.d_sae,),
            "W_dec": (cfg.d_sae, cfg.d_model),
            "b_dec": (cfg.d_model,),
        }
        given = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
        if cfg.architecture == "jumprelu":
            if threshold is None:
                raise SAEError("a jumprelu SAE needs a 'threshold' tensor of shape [d_sae]")
            expected["threshold"] = (cfg.d_sae,)
            given["threshold"] = threshold
        for name, tensor in given.items():
            if tuple(tensor.shape) != expected[name]:
                raise SAEError(f"SAE tensor {name} has shape {tuple(tensor.shape)}; expected {expected[name]}")
            if not tensor.is_floating_point():
                raise SAEError(f"SAE tensor {name} has dtype {tensor.dtype}; expected a floating-point dtype")
        self.W_enc = nn.Parameter(W_enc, requires_grad=False)
        self.b_enc = nn.Parameter(b_enc, requires_grad=False)
        self.W_dec = nn.Parameter(W_dec, requires_grad=False)
        self.b_dec = nn.Parameter(b_dec, requires_grad=False)
        self.threshold: Tensor | None
        self.register_buffer("threshold", threshold)

    # -- properties --------------------------------------------------------------------------
    @property
    def d_model(self) -> int:
        return self.cfg.d_model

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def k(self) -> int | None:
        return self.cfg.k

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def __repr__(self) -> str:
        c = self.cfg
        extra = f", k={c.k}" if c.architecture == "topk" else ""
        return (
            f"SAE({c.architecture}{extra}, d_model={c.d_model}, d_sae={c.d_sae}, layer={c.layer}, "
            f"format={c.source_format}, dtype={self.dtype})"
        )

    # -- math -------------------------------------------------------------------------------
    def _check_input(self, x: Tensor) -> None:
        if x.shape[-1] != self.d_model:
            raise SAEError(
                f"input last dimension is {x.shape[-1]} but the SAE reads d_model={self.d_model} "
                f"(input shape {tuple(x.shape)})"
            )

    def pre_acts(self, x: Tensor) -> Tensor:
        """Encoder pre-activations ``[..., d_sae]``."""
        self._check_input(x)
        x = x.to(self.dtype)
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return torch.nn.functional.linear(x, self.W_enc, self.b_enc)

    def activate(self, pre: Tensor) -> Tensor:
        """Apply the activation rule to pre-activations of all ``d_sae`` features (dense result)."""
        arch = self.cfg.architecture
        if arch == "relu":
            return torch.relu(pre)
        if arch == "jumprelu":
            assert self.threshold is not None
            return torch.relu(pre) * (pre > self.threshold)  # as SAELens / Gemma Scope: also 0 below 0
        assert self.cfg.k is not None
        values, indices = pre.topk(self.cfg.k, dim=-1, sorted=False)
        if self.cfg.relu_after_topk:
            values = torch.relu(values)
        return torch.zeros_like(pre).scatter_(-1, indices, values)

    def encode(self, x: Tensor) -> Tensor:
        """Dense feature activations ``[..., d_sae]``, zeros outside the active set."""
        return self.activate(self.pre_acts(x))

    def encode_sparse(self, x: Tensor) -> EncodeOutput:
        """Active features only: for TopK the k kept values and their ids, else the nonzeros' top-k."""
        pre = self.pre_acts(x)
        if self.cfg.architecture == "topk":
            assert self.cfg.k is not None
            values, indices = pre.topk(self.cfg.k, dim=-1, sorted=True)
            if self.cfg.relu_after_topk:
                values = torch.relu(values)
            return EncodeOutput(values, indices)
        acts = self.activate(pre)
        n = int((acts != 0).sum(-1).max().item()) if acts.numel() else 0
        values, indices = acts.topk(max(n, 1), dim=-1, sorted=True)
        return EncodeOutput(values, indices)

    def decode(self, acts: Tensor) -> Tensor:
        """Reconstruction ``[..., d_model]`` from dense activations ``[..., d_sae]``."""
        if acts.shape[-1] != self.d_sae:
            raise SAEError(f"decode expects [..., {self.d_sae}] activations, got shape {tuple(acts.shape)}")
        return acts.to(self.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def decoder_direction(self, feature: int, *, normalize: bool = True) -> Tensor:
        """Decoder row of ``feature`` ``[d_model]``, unit norm unless ``normalize=False``."""
        self.check_features([feature])
        row = self.W_dec[feature]
        return row / row.norm().clamp_min(1e-12) if normalize else row.clone()

    def check_features(self, features: list[int] | tuple[int, ...], *, where: str = "features") -> None:
        """Raise :class:`SAEError` naming ``where`` if any feature id is outside ``0..d_sae-1``."""
        bad = [f for f in features if not 0 <= int(f) < self.d_sae]
        if bad:
            raise SAEError(f"{where}: feature ids {bad} out of range; valid: 0..{self.d_sae - 1} (d_sae={self.d_sae})")

    @torch.no_grad()
    def fvu(self, x: Tensor) -> float:
        """Fraction of variance unexplained on ``x`` ``[n, d_model]``: ``|x - x_hat|² / |x - mean(x)|²``."""
        x = x.reshape(-1, self.d_model).to(self.dtype)
        err = (self(x) - x).pow(2).sum()
        var = (x - x.mean(0)).pow(2).sum()
        return float(err / var)

    # -- conversion / io ---------------------------------------------------------------------
    def to_dtype(self, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> SAE:
        """Move weights to ``dtype`` / ``device`` in place and return ``self``."""
        self.to(device=device, dtype=dtype)
        return self

    def tensors(self) -> dict[str, Tensor]:
        """The weights in our layout (``threshold`` only for JumpReLU)."""
        out = {"W_enc": self.W_enc.data, "b_enc": self.b_enc.data, "W_dec": self.W_dec.data, "b_dec": self.b_dec.data}
        if self.threshold is not None:
            out["threshold"] = self.threshold
        return out

    def save(self, path: str | os.PathLike[str], *, dtype: torch.dtype | None = None) -> Path:
        """Save in our format: ``cfg.json`` + ``sae.safetensors`` in folder ``path``."""
        from safetensors.torch import save_file

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        cfg = asdict(replace(self.cfg, source_format="guardrails"))
        cfg["format"] = "sae-guardrails"
        (folder / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n")
        tensors = {n: t.detach().to("cpu", dtype or t.dtype).contiguous() for n, t in self.tensors().items()}
        save_file(tensors, str(folder / "sae.safetensors"))
        return folder

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        layer: int | None = None,
        k: int | None = None,
        format: str | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> SAE:
        """Load an SAE file or folder with its format detected (or named by ``format``).

        ``path`` may be a Qwen-Scope ``layer{n}.sae.pt`` file, a folder of them plus ``layer=``, a
        SAELens / sparsify / our own folder, ``bundled`` (or ``bundled:layer15``) for the SAE shipped
        with the package, or ``hf://org/repo`` (Hugging Face hub, needs ``layer=``).
        """
        from guardrails.sae.loaders import load_sae

        return load_sae(path, layer=layer, k=k, format=format, dtype=dtype, device=device, **kwargs)

    @classmethod
    def from_hub(cls, repo_id: str, *, layer: int, k: int | None = None, **kwargs: Any) -> SAE:
        """Download ``layer{layer}.sae.pt`` of a Qwen-Scope repo (needs network) and load it."""
        from guardrails.sae.loaders import load_from_hub

        return load_from_hub(repo_id, layer=layer, k=k, **kwargs)
