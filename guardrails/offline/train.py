"""Train TopK SAEs with the Qwen-Scope recipe on activations of any causal LM.

Recipe (Gao et al. 2024, as used by Qwen-Scope): TopK activation with a user-chosen k and width,
decoder rows kept at unit norm (and their gradient projected off the row direction), ``b_dec``
initialised at the data mean, encoder initialised as the decoder's transpose, an AuxK loss that
reconstructs the residual error from the top dead latents, Adam. No ReLU on the kept values and no
``b_dec`` subtraction on the input, so the result loads like a Qwen-Scope file.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from guardrails.engine.hooks import StopForward, decoder_layers, stop_after_layer
from guardrails.offline.progress import progress_bar
from guardrails.sae.model import SAE, SAEConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainReport:
    """What a training run measured."""

    fvu: float
    """Fraction of variance unexplained on held-out activations."""
    dead_fraction: float
    """Share of latents that never fired on the held-out activations."""
    train_tokens: int
    """Activation vectors seen in training (with repeats over epochs)."""
    heldout_tokens: int
    """Activation vectors used for the held-out figures."""
    seconds: float
    """Wall-clock training time."""
    pca_fvu: float | None = None
    """FVU of a PCA with k components on the same held-out data (a dense baseline)."""


@torch.inference_mode()
def collect_activations(
    model: Any,
    tokenizer: Any,
    texts: Iterable[str],
    layers: Sequence[int],
    *,
    max_tokens: int,
    seq_len: int = 256,
    batch_size: int = 8,
    skip_first: int = 1,
    out_dtype: torch.dtype = torch.float16,
    progress: bool = True,
) -> dict[int, Tensor]:
    """Residual-stream activations after each block in ``layers``, ``{layer: [n_tokens, d_model]}``.

    The forward stops after the deepest layer. The first ``skip_first`` positions of each text (the
    attention sink) and padding are left out. Texts are truncated to ``seq_len`` tokens.
    """
    blocks = decoder_layers(model)
    captured: dict[int, Tensor] = {}
    handles = []

    def make_hook(layer: int) -> Any:
        def hook(_m: Any, _i: Any, output: Any) -> None:
            captured[layer] = output[0] if isinstance(output, tuple) else output

        return hook

    out: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    n = 0
    bar = progress_bar(total=max_tokens, unit="tok", desc="activations", disable=not progress)
    it = iter(texts)
    try:
        for layer in layers:
            handles.append(blocks[layer].register_forward_hook(make_hook(layer)))
        with stop_after_layer(model, max(layers)):
            while n < max_tokens:
                batch = [t for _, t in zip(range(batch_size), it, strict=False)]
                if not batch:
                    break
                enc = tokenizer(batch, return_tensors="pt", padding=True, truncation=True, max_length=seq_len)
                mask = enc["attention_mask"].bool()
                keep = mask.clone()
                # drop the first real positions of each row (right padding: they are columns 0..skip-1)
                keep[:, :skip_first] = False
                try:
                    model(**{k: v.to(model.device) for k, v in enc.items()}, use_cache=False)
                except StopForward:
                    pass
                for layer in layers:
                    acts = captured[layer][keep.to(captured[layer].device)]
                    out[layer].append(acts.to("cpu", out_dtype))
                added = int(keep.sum())
                n += added
                bar.update(added)
    finally:
        for h in handles:
            h.remove()
        bar.close()
    return {layer: torch.cat(chunks)[:max_tokens] for layer, chunks in out.items() if chunks}


def _unit_norm_(W_dec: Tensor) -> None:
    W_dec.data /= W_dec.data.norm(dim=1, keepdim=True).clamp_min(1e-8)


def _project_grad_(W_dec: Tensor) -> None:
    """Remove the gradient component parallel to each (unit) decoder row."""
    if W_dec.grad is None:
        return
    parallel = (W_dec.grad * W_dec.data).sum(1, keepdim=True)
    W_dec.grad -= parallel * W_dec.data


def _pca_fvu(train: Tensor, heldout: Tensor, k: int) -> float:
    mean = train.mean(0)
    sample = train[: min(len(train), 200_000)] - mean
    _, _, V = torch.linalg.svd(sample, full_matrices=False)
    basis = V[:k]
    centered = heldout - mean
    recon = centered @ basis.T @ basis
    return float((centered - recon).pow(2).sum() / (heldout - heldout.mean(0)).pow(2).sum())


def train_topk_sae(
    activations: Tensor,
    *,
    d_sae: int,
    k: int,
    epochs: int = 1,
    batch_size: int = 4096,
    lr: float | None = None,
    aux_k: int | None = None,
    aux_coef: float = 1 / 32,
    dead_after_tokens: int = 250_000,
    heldout_fraction: float = 0.05,
    seed: int = 0,
    layer: int | None = None,
    model_name: str | None = None,
    progress: bool = True,
    max_seconds: float | None = None,
    init: SAE | None = None,
    lr_decay: float = 0.0,
) -> tuple[SAE, TrainReport]:
    """Train a TopK SAE on ``activations`` ``[n, d_model]`` and measure it on a held-out slice.

    ``max_seconds`` ends training early (after the step that passes it); the report counts the steps run.
    ``init`` warm-starts from a trained TopK SAE of the same shape (fine-tuning it on new activations).
    ``lr_decay`` is the final fraction of training over which the learning rate falls linearly to zero;
    progress is the larger of steps done and, under ``max_seconds``, time used.
    """
    if not 0.0 <= lr_decay <= 1.0:
        raise ValueError(f"lr_decay must be in [0, 1], got {lr_decay}")
    if init is not None and (init.cfg.d_sae, init.cfg.d_model) != (d_sae, activations.shape[1]):
        raise ValueError(f"init SAE is {init.cfg.d_sae}x{init.cfg.d_model}; expected {d_sae}x{activations.shape[1]}")
    g = torch.Generator().manual_seed(seed)
    data = activations[torch.randperm(len(activations), generator=g)]
    n_held = max(1, int(len(data) * heldout_fraction))
    heldout, train = data[:n_held].float(), data[n_held:]
    d_model = data.shape[1]
    lr = lr if lr is not None else 2e-4 / math.sqrt(d_sae / 16384)
    aux_k = aux_k if aux_k is not None else min(d_model // 2, d_sae)

    if init is None:
        W_dec = torch.randn(d_sae, d_model, generator=g)
        _unit_norm_(W_dec)
        W_dec.requires_grad_(True)
        W_enc = W_dec.detach().clone().requires_grad_(True)
        b_enc = torch.zeros(d_sae, requires_grad=True)
        b_dec = train[:100_000].float().mean(0).clone().requires_grad_(True)
    else:
        W_dec = init.W_dec.detach().float().clone()
        _unit_norm_(W_dec)
        W_dec.requires_grad_(True)
        W_enc = init.W_enc.detach().float().clone().requires_grad_(True)
        b_enc = init.b_enc.detach().float().clone().requires_grad_(True)
        b_dec = init.b_dec.detach().float().clone().requires_grad_(True)
    opt = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec], lr=lr, betas=(0.9, 0.999), eps=6.25e-10)
    since_fired = torch.zeros(d_sae, dtype=torch.long)

    steps_per_epoch = len(train) // batch_size
    total = steps_per_epoch * epochs
    start = time.perf_counter()
    bar = progress_bar(total=total, unit="step", desc=f"train SAE d_sae={d_sae} k={k}", disable=not progress)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=g)
        for i in range(steps_per_epoch):
            elapsed = time.perf_counter() - start
            if max_seconds is not None and elapsed > max_seconds:
                break
            if lr_decay > 0:
                done = max(step / max(total, 1), elapsed / max_seconds if max_seconds else 0.0)
                for group in opt.param_groups:
                    group["lr"] = lr * min(1.0, max(0.0, 1.0 - done) / lr_decay)
            x = train[order[i * batch_size : (i + 1) * batch_size]].float()
            pre = x @ W_enc.T + b_enc
            vals, idx = pre.topk(k, dim=-1, sorted=False)
            # sum of the k chosen decoder rows (same as a dense scatter @ W_dec, ~1.6x faster per step)
            recon = F.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum") + b_dec
            err = x - recon
            var = (x - x.mean(0)).pow(2).sum()
            loss = err.pow(2).sum() / var
            fired = torch.zeros(d_sae, dtype=torch.bool)
            fired[idx.flatten()] = True
            since_fired += batch_size
            since_fired[fired] = 0
            dead = since_fired > dead_after_tokens
            aux = torch.tensor(0.0)
            if dead.any():
                dead_ids = dead.nonzero().squeeze(1)
                kk = min(aux_k, len(dead_ids))
                dvals, dpos = pre[:, dead_ids].topk(kk, dim=-1, sorted=False)  # top-k among dead only
                didx = dead_ids[dpos]
                err_hat = F.embedding_bag(didx, W_dec, per_sample_weights=dvals, mode="sum")
                target = err.detach()
                aux = (target - err_hat).pow(2).sum() / (target - target.mean(0)).pow(2).sum()
                loss = loss + aux_coef * torch.nan_to_num(aux, nan=0.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            _project_grad_(W_dec)
            torch.nn.utils.clip_grad_norm_([W_enc, b_enc, W_dec, b_dec], 1.0)
            opt.step()
            _unit_norm_(W_dec)
            step += 1
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(fvu=f"{float(loss - aux_coef * aux):.3f}", dead=int(dead.sum()))
    bar.close()
    seconds = time.perf_counter() - start

    cfg = SAEConfig(
        d_model=d_model,
        d_sae=d_sae,
        architecture="topk",
        k=k,
        layer=layer,
        model=model_name,
    )
    sae = SAE(cfg, W_enc.detach().clone(), b_enc.detach().clone(), W_dec.detach().clone(), b_dec.detach().clone())
    with torch.inference_mode():
        fvu = sae.fvu(heldout)
        counts = torch.zeros(d_sae)
        for chunk in heldout.split(8192):
            counts += (sae.encode(chunk) != 0).sum(0).float()
        dead_fraction = float((counts == 0).float().mean())
        pca = _pca_fvu(train.float(), heldout, k)
    report = TrainReport(
        fvu=fvu,
        dead_fraction=dead_fraction,
        train_tokens=step * batch_size,
        heldout_tokens=len(heldout),
        seconds=seconds,
        pca_fvu=pca,
    )
    meta = {
        "recipe": "TopK (Gao et al. 2024 / Qwen-Scope): unit-norm decoder, AuxK dead-latent loss, Adam",
        "k": k,
        "d_sae": d_sae,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "aux_k": aux_k,
        "aux_coef": aux_coef,
        "lr_decay": lr_decay,
        "warm_start": init is not None,
        **{f"report_{key}": value for key, value in report.__dict__.items()},
    }
    object.__setattr__(sae.cfg, "metadata", meta)
    return sae, report


def save_with_report(sae: SAE, report: TrainReport, folder: str | Path, extra: dict[str, Any]) -> Path:
    """Save ``sae`` (fp16 weights) in our format plus ``TRAINING.json`` describing the run."""
    path = sae.save(folder, dtype=torch.float16)
    record = {**report.__dict__, **extra, "config": sae.cfg.metadata}
    (path / "TRAINING.json").write_text(json.dumps(record, indent=2) + "\n")
    return path
