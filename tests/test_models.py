"""Model loading: reduced-precision weights on CPUs without half-precision units are warned about."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from guardrails.serving import models
from tests.builders import tiny_lm, tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny") / "model"
    tok = tiny_tokenizer()
    tiny_lm("llama", tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(("has_units", "dtype", "warned"), [
    (False, "bfloat16", True), (False, "float16", True), (True, "bfloat16", False), (False, None, False),
])
def test_half_precision_on_a_cpu_without_units_is_warned(
    tiny_folder: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    has_units: bool, dtype: str | None, warned: bool,
) -> None:
    monkeypatch.setattr(models, "cpu_has_half_units", lambda: has_units)
    with caplog.at_level(logging.WARNING, logger=models.__name__):
        lm, _ = models.load_model(str(tiny_folder), dtype=dtype)
    assert lm.dtype == (models.parse_dtype(dtype) or torch.float32)
    hits = [r for r in caplog.records if "run several times slower than float32" in r.getMessage()]
    assert bool(hits) == warned, caplog.text


def test_cpu_flags_are_read_from_proc_cpuinfo(tmp_path: Path) -> None:
    for flags, want in (("avx avx2 fma", False), ("avx2 avx512f avx512_bf16", True), ("amx_bf16 amx_tile", True)):
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor : 0\nflags : fpu {flags} sse2\n")
        assert models.cpu_has_half_units(info) is want, flags
    assert models.cpu_has_half_units(tmp_path / "missing") is True  # can't tell: no warning
