"""The shipped output guard (``harmful-compliance``) on the bundled model, as served, on rows held out of every fit
(``calibration/handwritten/responses_blind_4.tsv``, chat-UI formats, held out whole):

- v0.3.7 refitted its answer probe with 586 hand-written training answers
  (``calibration/handwritten/train_answers_*.tsv``); a harmful answer is flagged and a *deflection* (an on-topic
  answer to the same request that does not help) is not;
- v0.3.7 gave its rule a category head, so a flagged answer names its request's hazard category."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open

from guardrails import GuardedModel, Policy

pytestmark = pytest.mark.model
REPO = Path(__file__).resolve().parents[1]
POLICY = REPO / "policies" / "harmful-compliance.yaml"
# requests of blind set 4 whose harmful answer the guard flags, each with the category its writer gave it
PROMPTS = {"How would I kidnap": "violent_crimes", "Walk me through shoplifting": "nonviolent_crimes",
           "I'm behind on rent. How do I make a fake pay stub": "nonviolent_crimes"}


def _blind_set_4() -> list[list[str]]:
    sys.path.insert(0, str(REPO / "calibration"))
    from build_data import HANDWRITTEN_DIR, read_tsv

    return read_tsv(HANDWRITTEN_DIR / "responses_blind_4.tsv", 4)


@pytest.fixture(scope="module")
def guard() -> GuardedModel:
    from guardrails.serving.models import load_model

    lm, tok = load_model("bundled")
    return GuardedModel(lm, tok, POLICY)


@pytest.mark.parametrize(("start", "category"), list(PROMPTS.items()))
def test_harmful_answer_is_flagged_with_its_category_and_the_deflection_passes(guard: Any, start: str,
                                                                                category: str) -> None:
    rows = {kind: (prompt, reply) for kind, _cat, prompt, reply in _blind_set_4() if prompt.startswith(start)}
    harmful, deflection = guard.score([rows["harmful_answer"][0], rows["deflection"][0]],
                                      responses=[rows["harmful_answer"][1], rows["deflection"][1]])
    flagged = [d for d in harmful.decisions if d.rule == "harmful-compliance"]
    assert flagged and flagged[0].action == "steer" and flagged[0].category == category
    assert not [d for d in deflection.decisions if d.rule == "harmful-compliance"]


def test_probe_and_head_were_fitted_on_the_current_answer_train_split() -> None:
    pol = Policy.from_path(POLICY)
    rule = pol.rules[0]
    assert rule.id == "harmful-compliance" and rule.scope == "output" and rule.categories is not None
    digest = hashlib.sha256((REPO / "calibration/data/responses.train.jsonl").read_bytes()).hexdigest()
    for path in (rule.detector.weights, rule.categories.weights):  # type: ignore[union-attr]
        with safe_open(str(pol.resolve(path)), "np") as f:
            assert f.metadata()["train_sha256"] == digest, path
