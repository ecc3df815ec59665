"""The TopK SAE trainer (guardrails/offline/train.py) on data with a known sparse structure."""

from __future__ import annotations

import pytest
import torch

from guardrails.offline.train import train_topk_sae


def sparse_data(n: int, seed: int, d_model: int = 32, atoms: int = 64, active: int = 4) -> torch.Tensor:
    """Each row is a positive mix of `active` of `atoms` fixed random unit directions (codes from `seed`)."""
    dictionary = torch.randn(atoms, d_model, generator=torch.Generator().manual_seed(0))
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    g = torch.Generator().manual_seed(seed)
    codes = torch.zeros(n, atoms)
    idx = torch.rand(n, atoms, generator=g).argsort(dim=1)[:, :active]
    codes.scatter_(1, idx, torch.rand(n, active, generator=g) + 0.5)
    return codes @ dictionary


def test_recovers_sparse_structure_better_than_pca() -> None:
    x = sparse_data(20_000, seed=1)
    sae, report = train_topk_sae(x, d_sae=64, k=4, epochs=8, batch_size=256, lr=3e-3, progress=False)
    # PCA with 4 components cannot represent mixes of 4 of 64 directions in 32 dimensions
    assert report.pca_fvu is not None and report.pca_fvu > 0.4, report
    assert report.fvu < 0.5 * report.pca_fvu, report
    assert report.train_tokens == 8 * (19_000 // 256) * 256  # 5% held out, whole batches only
    assert sae.fvu(sparse_data(2_000, seed=2)) < 0.5 * report.pca_fvu  # fresh rows, same directions


def test_max_seconds_stops_training() -> None:
    x = sparse_data(4_000, seed=1)
    _, report = train_topk_sae(x, d_sae=64, k=4, epochs=3, batch_size=256, max_seconds=0.0, progress=False)
    assert report.train_tokens == 0


def test_warm_start_continues_from_the_given_sae() -> None:
    x = sparse_data(8_000, seed=1)
    first, _ = train_topk_sae(x, d_sae=64, k=4, epochs=8, batch_size=256, lr=3e-3, progress=False)
    fresh = sparse_data(2_000, seed=3)
    # no steps: the warm start returns the SAE it was given; a cold start returns its random init
    same, _ = train_topk_sae(x, d_sae=64, k=4, epochs=1, max_seconds=0.0, init=first, progress=False)
    cold, _ = train_topk_sae(x, d_sae=64, k=4, epochs=1, max_seconds=0.0, progress=False)
    assert abs(same.fvu(fresh) - first.fvu(fresh)) < 1e-5
    assert cold.fvu(fresh) > 2 * first.fvu(fresh)
    # fine-tuning with a decaying learning rate keeps (or improves) what it started from
    tuned, _ = train_topk_sae(x, d_sae=64, k=4, epochs=2, batch_size=256, lr=1e-3, init=first, lr_decay=0.5,
                              progress=False)
    assert tuned.fvu(fresh) <= first.fvu(fresh) * 1.05, (tuned.fvu(fresh), first.fvu(fresh))
    assert (tuned.cfg.metadata or {})["warm_start"] is True


def test_bad_warm_start_and_decay_are_rejected() -> None:
    x = sparse_data(1_000, seed=1)
    small, _ = train_topk_sae(x, d_sae=32, k=4, epochs=1, max_seconds=0.0, progress=False)
    with pytest.raises(ValueError, match="init SAE is 32x32; expected 64x32"):
        train_topk_sae(x, d_sae=64, k=4, init=small, progress=False)
    with pytest.raises(ValueError, match="lr_decay must be in"):
        train_topk_sae(x, d_sae=64, k=4, lr_decay=1.5, progress=False)
