"""Feature discovery: ranking on planted data, AUROC per feature, token contexts, max pooling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guardrails.offline.calibrate import max_pooled_features
from guardrails.offline.discover import draft_rule, explain, feature_aurocs, rank_features, scored_tokens
from tests.builders import random_sae


def _planted(n: int = 200, d: int = 64, planted: int = 17, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = np.maximum(rng.normal(0, 1, (n, d)), 0)
    x[:, planted] = np.maximum(rng.normal(0, 0.5, n) + 2.0 * y, 0)
    return x, y


def test_planted_feature_ranks_first() -> None:
    x, y = _planted()
    stats = rank_features(x, y, top=5)
    assert stats[0].feature == 17
    assert stats[0].auroc > 0.9
    # frequencies and means, recomputed by hand
    assert stats[0].freq_pos == pytest.approx(float((x[y == 1, 17] > 0).mean()))
    assert stats[0].mean_diff == pytest.approx(float(x[y == 1, 17].mean() - x[y == 0, 17].mean()))
    assert [s.auroc for s in stats] == sorted((s.auroc for s in stats), reverse=True)


def test_feature_aurocs_match_sklearn() -> None:
    from sklearn.metrics import roc_auc_score

    x, y = _planted(n=120, d=12, planted=3, seed=1)
    x[:, 5] = 0.0  # all ties: AUROC 0.5
    x[:, 6] = np.round(x[:, 6])  # many ties
    got = feature_aurocs(x, y)
    want = [roc_auc_score(y, x[:, j]) for j in range(x.shape[1])]
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_one_label_is_an_error() -> None:
    with pytest.raises(ValueError, match="both labels"):
        feature_aurocs(np.ones((4, 3)), np.ones(4))


def test_max_pooled_features_equals_manual_encode() -> None:
    sae = random_sae(d_model=16, d_sae=32, k=4)
    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(5, 16, generator=g), torch.randn(0, 16), torch.randn(3, 16, generator=g)]
    got = max_pooled_features(sae, rows, batch_tokens=3)  # batches cut across rows
    assert np.all(got[1] == 0)
    for i in (0, 2):
        want = sae.encode(rows[i]).max(0).values.numpy()
        np.testing.assert_allclose(got[i], want, rtol=1e-6, atol=1e-6)


def test_scored_tokens_align_with_collected_residuals(tok, lm) -> None:
    from guardrails.offline.activations import collect_residuals

    model = lm("llama")
    prompts = ["Tell me a story", "How do I bake bread at home?"]
    responses = ["Paris is the capital.", "Mix flour and water."]
    for scope, resp in (("input", None), ("output", responses)):
        got = collect_residuals(model, tok, prompts, [1], responses=resp, scope=scope, progress=False)[1]
        ctx = scored_tokens(tok, prompts, resp, scope)
        assert [len(c) for c in ctx] == [len(r) for r in got]
    # the token in [[...]] is the scored one: first output token of row 0 is the start of the response
    ctx = scored_tokens(tok, prompts, responses, "output")
    first = ctx[0][0].split("[[")[1].rstrip("]")
    assert "Paris".startswith(first.strip())


def test_explain_finds_planted_token_and_draft_rule() -> None:
    sae = random_sae(d_model=16, d_sae=32, k=32, architecture="relu")
    direction = sae.W_enc.data[9] / sae.W_enc.data[9].norm()
    g = torch.Generator().manual_seed(1)
    rows = [torch.randn(4, 16, generator=g) * 0.1 for _ in range(3)]
    rows[1][2] += 20 * direction  # feature 9 fires hardest at row 1, token 2
    ctx = [[f"r{i}t{j}" for j in range(4)] for i in range(3)]
    ex = explain(sae, rows, ctx, [9], n=2)
    assert ex[9][0][1] == "r1t2"
    x, y = _planted(d=20, planted=9)
    rule = draft_rule(rank_features(x, y), n_features=3, explanations=ex, threshold=1.5)
    assert rule["detector"]["features"][0]["id"] == 9
    assert len(rule["detector"]["features"]) <= 3
    from guardrails.core.policy import Policy

    Policy.from_dict({"name": "d", "saes": {"main": {"path": "x", "layer": 1}}, "rules": [rule]})  # valid YAML shape


def test_explain_shows_a_repeated_text_once() -> None:
    sae = random_sae(d_model=16, d_sae=32, k=32, architecture="relu")
    direction = sae.W_enc.data[9] / sae.W_enc.data[9].norm()
    g = torch.Generator().manual_seed(2)
    base = torch.randn(4, 16, generator=g) * 0.1
    base[1] += 20 * direction
    other = torch.randn(4, 16, generator=g) * 0.1
    other[3] += 10 * direction
    rows = [base.clone(), base.clone(), base.clone(), other]  # one text three times, then another
    ctx = [["a", "b", "c", "d"]] * 3 + [["w", "x", "y", "z"]]
    got = explain(sae, rows, ctx, [9], n=3)[9]
    assert [w for _, w in got] == ["b", "z"]  # the repeated text once, then the next distinct context
