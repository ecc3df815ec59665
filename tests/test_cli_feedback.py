"""CLI feedback: ``validate`` checks files, widths and layers from headers and configs (no weights loaded);
``train-sae`` refuses to write an SAE it did not train; short result reprs."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.builders import random_sae


def _cli(args: list[str]) -> object:
    from guardrails.cli.main import app

    return CliRunner().invoke(app, args)


def _policy(tmp_path: Path, sae_path: str, *, feature: int = 3, layer: int = 15, model: str = "bundled") -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(f"""
name: check-me
model: {model}
saes: {{s: {{path: "{sae_path}", layer: {layer}}}}}
rules:
  - id: r
    scope: input
    detector: {{sae: s, features: [{feature}]}}
    threshold: 1.0
""")
    return path


@pytest.fixture
def sae_dir(tmp_path: Path) -> Path:
    return random_sae(d_model=576, d_sae=128, k=8, layer=15).save(tmp_path / "sae")


def test_header_gives_width_and_hidden_size(sae_dir: Path) -> None:
    from guardrails.cli.checks import sae_header

    assert sae_header(sae_dir) == (128, 576)


def test_validate_accepts_a_good_policy(tmp_path: Path, sae_dir: Path) -> None:
    res = _cli(["validate", str(_policy(tmp_path, str(sae_dir), feature=127))])
    assert res.exit_code == 0, res.output  # type: ignore[attr-defined]


@pytest.mark.parametrize(("kw", "message"), [
    ({"feature": 128}, "features[0].id: 128 out of range; valid: 0..127"),
    ({"layer": 30}, "saes.s.layer: 30 out of range; valid: 0..29"),
    ({"sae": "missing-folder"}, "not found"),
])
def test_validate_rejects_what_only_deep_caught_before(tmp_path: Path, sae_dir: Path, kw: dict, message: str) -> None:
    sae = str(tmp_path / kw.pop("sae")) if "sae" in kw else str(sae_dir)
    res = _cli(["validate", str(_policy(tmp_path, sae, **kw))])
    out = " ".join(res.output.split())  # type: ignore[attr-defined]
    assert res.exit_code == 1 and message in out, out  # type: ignore[attr-defined]


def test_validate_rejects_an_sae_of_another_width(tmp_path: Path) -> None:
    other = random_sae(d_model=64, d_sae=32, layer=15).save(tmp_path / "small")
    res = _cli(["validate", str(_policy(tmp_path, str(other)))])
    out = " ".join(res.output.split())  # type: ignore[attr-defined]
    assert res.exit_code == 1 and "d_model=64 but the model's hidden size is 576" in out


def test_a_shipped_policy_copied_elsewhere_gets_a_hint(tmp_path: Path) -> None:
    """Copying a shipped policy breaks its relative ``../calibration/probes`` references; the error names the
    shipped file and the command that writes a working copy."""
    from guardrails._data import shipped_policy

    src = shipped_policy("harmful-requests-probe")
    assert src is not None
    copied = tmp_path / "mine.yaml"
    copied.write_text(src.read_text(encoding="utf-8"), encoding="utf-8")
    res = _cli(["validate", str(copied)])
    text = " ".join(res.output.split())  # type: ignore[attr-defined]
    assert res.exit_code == 1  # type: ignore[attr-defined]
    assert "a shipped policy copied elsewhere?" in text and "--out FILE" in text
    assert "calibration/probes/" in text.split("absolute path")[1]


def test_train_sae_refuses_zero_steps(tmp_path: Path) -> None:
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("Hello there.\nA second short line.\n")
    out = tmp_path / "sae"
    res = _cli(["train-sae", "--corpus", str(corpus), "--out", str(out), "--layer", "1", "--width", "64", "--k", "4",
                "--tokens", "1000", "--epochs", "1"])
    text = " ".join(res.output.split())  # type: ignore[attr-defined]
    assert res.exit_code != 0 and "0 training steps" in text, text  # type: ignore[attr-defined]
    assert not out.exists()


def test_feature_trace_is_one_column_of_the_encode(lm: object, tok: object) -> None:
    import torch

    from guardrails.serving.inspect import feature_trace

    model = lm("llama")  # type: ignore[operator]
    sae = random_sae(d_model=64, d_sae=256, k=8, layer=1, seed=4)
    text = "Tell me a story about a robot"
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids  # type: ignore[operator]
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[2][0]
    acts = sae.encode(hidden)
    feature = int(acts[1:].sum(0).argmax())  # a feature that fires somewhere
    trace = feature_trace(text, feature, sae=sae, model=model, tokenizer=tok)
    assert len(trace) == ids.shape[1]
    for r in trace:
        assert r["activation"] == pytest.approx(float(acts[r["position"], feature]), abs=1e-3)
        if r["rank"] is not None:
            assert r["rank"] == int((acts[r["position"]] > acts[r["position"], feature]).sum()) + 1
    assert any(r["rank"] is not None for r in trace)
    with pytest.raises(ValueError, match=r"feature 256 out of range; valid: 0\.\.255"):
        feature_trace(text, 256, sae=sae, model=model, tokenizer=tok)


def test_generation_result_repr_is_short() -> None:
    from guardrails.core.decision import Decision
    from guardrails.serving.result import GenerationResult

    d = Decision(action="block", rule="harm", score=2.0, threshold=1.0, position=7, scope="output")
    r = GenerationResult(text="I can't help with that." * 10, blocked=True, steered=False, decisions=[d],
                         prompt="p" * 999, output_ids=[1, 2], token_scores={"harm": {i: 0.5 for i in range(500)}},
                         policy="pol")
    text = repr(r)
    assert len(text) < 200 and text.startswith("GenerationResult(blocked,") and "['harm']" in text


def test_progress_bars_redraw_rarely_in_a_log(monkeypatch: pytest.MonkeyPatch) -> None:
    """Off a terminal (a CI log, ``> log 2>&1``) a bar redraws at most every LOG_INTERVAL_S seconds (it wrote about
    300 copies of an activation pass's bar); on a terminal, or where the caller or TQDM_MININTERVAL says, tqdm's
    own setting stands."""
    import io

    from guardrails.offline import progress

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    monkeypatch.delitem(__import__("sys").modules, "ipykernel", raising=False)
    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)
    bar = progress.progress_bar(total=1000, disable=False, file=log)
    assert bar.mininterval == progress.LOG_INTERVAL_S
    for _ in range(1000):
        bar.update(1)
    bar.close()
    assert log.getvalue().count("\r") <= 3  # the first draw and the last, not one per 0.1 s

    def interval(**kw: object) -> float:
        bar = progress.progress_bar(total=1, disable=False, file=io.StringIO(), **kw)
        bar.close()
        return float(bar.mininterval)

    assert interval(mininterval=0.5) == 0.5  # the caller's
    monkeypatch.setenv("TQDM_MININTERVAL", "2")  # tqdm reads it at import: here, ours is not applied over it
    assert interval() != progress.LOG_INTERVAL_S
    monkeypatch.delenv("TQDM_MININTERVAL")
    monkeypatch.setattr("sys.stderr", Tty())
    assert interval() == 0.1  # a terminal: tqdm's default
