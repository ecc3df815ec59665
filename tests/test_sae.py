"""SAE math against formulas computed by hand in each test (Qwen-Scope TopK, JumpReLU, ReLU, sparsify)."""

from __future__ import annotations

import pytest
import torch

from guardrails.sae.model import SAE, EncodeOutput, SAEConfig, SAEError

D_MODEL, D_SAE, K = 32, 96, 6


def _weights(seed: int = 0, b_enc_shift: float = 0.0) -> dict[str, torch.Tensor]:
    """Random weights in our layout: W_enc [d_sae, d_model], W_dec [d_sae, d_model]."""
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(D_SAE, D_MODEL, generator=g) / D_MODEL**0.5,
        "b_enc": torch.randn(D_SAE, generator=g) * 0.2 + b_enc_shift,
        "W_dec": torch.randn(D_SAE, D_MODEL, generator=g) / D_SAE**0.5,
        "b_dec": torch.randn(D_MODEL, generator=g) * 0.5,
    }


def _sae(w: dict[str, torch.Tensor], threshold: torch.Tensor | None = None, **cfg: object) -> SAE:
    conf = SAEConfig(d_model=D_MODEL, d_sae=D_SAE, **cfg)  # type: ignore[arg-type]
    return SAE(conf, w["W_enc"].clone(), w["b_enc"].clone(), w["W_dec"].clone(), w["b_dec"].clone(), threshold)


def _x(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, D_MODEL, generator=torch.Generator().manual_seed(seed))


def _topk_dense(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest entries of each row, by sorting (not ``topk``), zeros elsewhere."""
    order = pre.argsort(dim=-1, descending=True)[..., :k]
    keep = torch.zeros_like(pre, dtype=torch.bool).scatter(-1, order, True)
    return torch.where(keep, pre, torch.zeros_like(pre))


# -- TopK (Qwen-Scope) ---------------------------------------------------------------------------------


def test_topk_encode_is_the_qwen_scope_formula_without_relu() -> None:
    # b_enc shifted down so that some of the top-k pre-activations are negative: Qwen-Scope keeps them
    w = _weights(b_enc_shift=-1.5)
    sae = _sae(w, architecture="topk", k=K)
    x = _x(3, 5)
    pre = x @ w["W_enc"].T + w["b_enc"]
    expected = _topk_dense(pre, K)
    acts = sae.encode(x)
    assert acts.shape == (3, 5, D_SAE)
    torch.testing.assert_close(acts, expected)
    assert ((acts != 0).sum(-1) == K).all()
    assert (acts < 0).any(), "the test needs negative kept values to show there is no ReLU"


def test_decode_is_acts_times_w_dec_plus_b_dec() -> None:
    w = _weights()
    sae = _sae(w, architecture="topk", k=K)
    acts = sae.encode(_x(4))
    # per-feature sum of decoder rows, written as a loop
    expected = torch.stack([
        sum((acts[n, i] * w["W_dec"][i] for i in range(D_SAE)), torch.zeros(D_MODEL)) + w["b_dec"]
        for n in range(4)
    ])
    torch.testing.assert_close(sae.decode(acts), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(_x(4)), expected, rtol=1e-5, atol=1e-5)


def test_sparsify_variant_subtracts_b_dec_and_applies_relu() -> None:
    w = _weights(b_enc_shift=-1.5)
    sae = _sae(w, architecture="topk", k=K, apply_b_dec_to_input=True, relu_after_topk=True)
    x = _x(7)
    pre = torch.relu((x - w["b_dec"]) @ w["W_enc"].T + w["b_enc"])
    expected = _topk_dense(pre, K)
    acts = sae.encode(x)
    torch.testing.assert_close(acts, expected)
    assert (acts >= 0).all()
    # and it differs from the Qwen-Scope rule on the same weights
    assert not torch.allclose(acts, _sae(w, architecture="topk", k=K).encode(x))


# -- JumpReLU and ReLU ---------------------------------------------------------------------------------


def test_jumprelu_keeps_positive_values_above_threshold() -> None:
    w = _weights()
    # some thresholds negative: Gemma Scope / SAELens still zero negative pre-activations
    thr = torch.rand(D_SAE, generator=torch.Generator().manual_seed(5)) - 0.3
    sae = _sae(w, threshold=thr, architecture="jumprelu")
    x = _x(6)
    pre = x @ w["W_enc"].T + w["b_enc"]
    expected = torch.where((pre > thr) & (pre > 0), pre, torch.zeros_like(pre))
    acts = sae.encode(x)
    torch.testing.assert_close(acts, expected)
    n_active = (acts != 0).sum()
    assert 0 < n_active < acts.numel()
    assert ((pre > thr) & (pre < 0)).any(), "the test needs negative pre-activations above a negative threshold"


def test_jumprelu_needs_a_threshold() -> None:
    with pytest.raises(SAEError, match="threshold"):
        _sae(_weights(), architecture="jumprelu")


@pytest.mark.parametrize("b_dec_in", [False, True])
def test_relu_encode(b_dec_in: bool) -> None:
    w = _weights()
    sae = _sae(w, architecture="relu", apply_b_dec_to_input=b_dec_in)
    x = _x(2, 3)
    xin = x - w["b_dec"] if b_dec_in else x
    pre = xin @ w["W_enc"].T + w["b_enc"]
    torch.testing.assert_close(sae.encode(x), pre.clamp(min=0))


# -- sparse output, directions, fvu ---------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["topk", "jumprelu", "relu"])
def test_encode_sparse_matches_encode(arch: str) -> None:
    w = _weights()
    thr = torch.full((D_SAE,), 0.3) if arch == "jumprelu" else None
    sae = _sae(w, threshold=thr, architecture=arch, k=K if arch == "topk" else None)
    x = _x(3, 4)
    dense = sae.encode(x)
    out = sae.encode_sparse(x)
    assert isinstance(out, EncodeOutput)
    assert out.indices.dtype == torch.int64
    rebuilt = torch.zeros_like(dense).scatter(-1, out.indices, out.values)
    torch.testing.assert_close(rebuilt, dense)
    # values sorted, largest first
    assert (out.values[..., :-1] >= out.values[..., 1:]).all()
    if arch == "topk":
        assert out.values.shape == (3, 4, K)
    else:
        assert out.values.shape[-1] == int((dense != 0).sum(-1).max())


def test_decoder_direction() -> None:
    w = _weights()
    sae = _sae(w, architecture="topk", k=K)
    d = sae.decoder_direction(7)
    torch.testing.assert_close(d.norm(), torch.tensor(1.0))
    torch.testing.assert_close(d * w["W_dec"][7].norm(), w["W_dec"][7])
    torch.testing.assert_close(sae.decoder_direction(7, normalize=False), w["W_dec"][7])
    with pytest.raises(SAEError, match=rf"\[{D_SAE}\].*0\.\.{D_SAE - 1}"):
        sae.decoder_direction(D_SAE)


def test_fvu_formula_and_limits() -> None:
    w = _weights()
    sae = _sae(w, architecture="topk", k=K)
    x = _x(50)
    x_hat = sae.decode(sae.encode(x))
    expected = float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    assert sae.fvu(x) == pytest.approx(expected, rel=1e-5)

    # identity SAE on positive inputs reconstructs exactly: FVU 0
    eye = SAE(SAEConfig(d_model=D_MODEL, d_sae=D_MODEL, architecture="relu"), torch.eye(D_MODEL),
              torch.zeros(D_MODEL), torch.eye(D_MODEL), torch.zeros(D_MODEL))
    xp = x.abs() + 0.1
    assert eye.fvu(xp) == pytest.approx(0.0, abs=1e-10)
    # an SAE that always outputs the mean explains nothing: FVU 1
    mean_only = SAE(SAEConfig(d_model=D_MODEL, d_sae=D_MODEL, architecture="relu"), torch.eye(D_MODEL),
                    torch.zeros(D_MODEL), torch.zeros(D_MODEL, D_MODEL), xp.mean(0))
    assert mean_only.fvu(xp) == pytest.approx(1.0, rel=1e-5)


# -- dtypes and errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype: torch.dtype) -> None:
    w = _weights()
    sae = _sae(w, architecture="relu").to_dtype(dtype)
    assert sae.dtype == dtype and sae.W_enc.dtype == dtype and sae.b_dec.dtype == dtype
    x = _x(8)
    acts = sae.encode(x)  # float32 input is cast to the SAE's dtype
    assert acts.dtype == dtype
    ref = (x @ w["W_enc"].T + w["b_enc"]).clamp(min=0)
    tol = 3e-2 if dtype == torch.bfloat16 else 5e-3
    torch.testing.assert_close(acts.float(), ref, rtol=tol, atol=tol)
    assert sae.decode(acts).dtype == dtype


def test_topk_half_precision_selects_the_same_features() -> None:
    w = _weights()
    sae = _sae(w, architecture="topk", k=K)
    x = _x(16)
    full = sae.encode(x)
    half = _sae(w, architecture="topk", k=K).to_dtype(torch.bfloat16).encode(x)
    overlap = ((full != 0) & (half != 0)).sum() / (full != 0).sum()
    assert overlap > 0.9  # rounding may swap near-ties only


def test_wrong_input_width_names_both_numbers() -> None:
    sae = _sae(_weights(), architecture="topk", k=K)
    with pytest.raises(SAEError, match=rf"{D_MODEL + 1}.*d_model={D_MODEL}"):
        sae.encode(torch.randn(2, D_MODEL + 1))
    with pytest.raises(SAEError, match=rf"{D_SAE}.*\(2, 5\)"):
        sae.decode(torch.randn(2, 5))


@pytest.mark.parametrize(
    ("cfg", "pattern"),
    [
        (dict(architecture="topk"), "needs k"),
        (dict(architecture="topk", k=D_SAE + 1), rf"k={D_SAE + 1}.*1\.\.{D_SAE}"),
        (dict(architecture="topk", k=0), r"1\.\."),
        (dict(architecture="gated"), "valid: topk, jumprelu, relu"),
    ],
)
def test_config_errors(cfg: dict[str, object], pattern: str) -> None:
    with pytest.raises(SAEError, match=pattern):
        SAEConfig(d_model=D_MODEL, d_sae=D_SAE, **cfg)  # type: ignore[arg-type]


def test_constructor_names_the_tensor_with_a_wrong_shape() -> None:
    w = _weights()
    with pytest.raises(SAEError, match=rf"W_dec has shape \({D_MODEL}, {D_SAE}\); expected \({D_SAE}, {D_MODEL}\)"):
        SAE(SAEConfig(d_model=D_MODEL, d_sae=D_SAE, architecture="topk", k=K), w["W_enc"], w["b_enc"],
            w["W_dec"].T.contiguous(), w["b_dec"])


# -- the "watched features only" encoder agrees with the full encode ------------------------------------------


def test_watched_encoder_matches_sae_for_relu() -> None:
    from guardrails.engine.scorers import WatchedEncoder

    w = _weights()
    sae = _sae(w, architecture="relu", apply_b_dec_to_input=True)
    feats = [0, 5, 17, 60]
    x = _x(4, 3)
    torch.testing.assert_close(WatchedEncoder(sae, feats)(x), sae.encode(x)[..., feats])


def test_watched_encoder_matches_sae_for_jumprelu_with_negative_thresholds() -> None:
    from guardrails.engine.scorers import WatchedEncoder

    w = _weights()
    thr = torch.rand(D_SAE, generator=torch.Generator().manual_seed(5)) - 0.3
    sae = _sae(w, threshold=thr, architecture="jumprelu")
    feats = list(range(0, D_SAE, 3))
    x = _x(6)
    torch.testing.assert_close(WatchedEncoder(sae, feats)(x), sae.encode(x)[..., feats])
