"""The TopK SAE trainer (guardrails/offline/train.py) on data with a known sparse structure."""

from __future__ import annotations

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
