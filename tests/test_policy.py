"""Policies from inline YAML: a valid one parses to what it says; each bad one names its YAML path."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from guardrails.core.policy import LinearDetector, Policy, PolicyError, SAEFeaturesDetector

VALID = textwrap.dedent("""\
    name: demo
    version: "2"
    description: test policy
    saes:
      main: {path: saes/layer1.sae.pt, layer: 1, k: 8, dtype: bfloat16}
    score_mode: watched
    on_error: flag
    refusal: "No."
    rules:
      - id: harm
        description: harmful requests
        scope: input
        detector:
          sae: main
          features: {3: 1.0, 17: 0.5}
          combine: max
          window: 4
          aggregate: sum
        threshold: 2.5
        action: block
        message: "Blocked."
      - id: steer-away
        detector: {sae: main, features: [5, {id: 6, weight: -1, label: six}]}
        threshold: 1
        action: steer
        steer: {method: clamp, features: [5]}
      - id: probe
        scope: both
        detector: {kind: linear, layer: 2, weights: probe.safetensors, method: diffmean}
        threshold: 0.1
        action: flag
        on_error: allow
    """)


def _err(text: str) -> str:
    with pytest.raises(PolicyError) as info:
        Policy.from_yaml(text, source="bad.yaml")
    return str(info.value)


def _edit(old: str, new: str) -> str:
    assert old in VALID, old
    return VALID.replace(old, new, 1)


def test_valid_policy_parses_to_what_it_says() -> None:
    p = Policy.from_yaml(VALID)
    assert (p.name, p.version, p.score_mode, p.on_error, p.refusal) == ("demo", "2", "watched", "flag", "No.")
    assert p.saes["main"].layer == 1 and p.saes["main"].k == 8 and p.saes["main"].dtype == "bfloat16"
    harm, steer, probe = p.rules
    assert isinstance(harm.detector, SAEFeaturesDetector)
    assert [(f.id, f.weight) for f in harm.detector.features] == [(3, 1.0), (17, 0.5)]
    assert (harm.scope, harm.action, harm.threshold, harm.message) == ("input", "block", 2.5, "Blocked.")
    assert (harm.detector.combine, harm.detector.window, harm.detector.aggregate) == ("max", 4, "sum")
    assert harm.on_error is None and harm.steer is None
    # defaults
    assert steer.scope == "output" and steer.detector.kind == "sae_features"
    assert isinstance(steer.detector, SAEFeaturesDetector)
    assert [(f.id, f.weight, f.label) for f in steer.detector.features] == [(5, 1.0, None), (6, -1.0, "six")]
    assert steer.steer is not None and steer.steer.method == "clamp" and steer.steer.features == [5]
    assert isinstance(probe.detector, LinearDetector) and probe.detector.layer == 2
    assert probe.on_error == "allow"
    assert p.layers() == [1, 2]


def test_steer_action_gets_default_settings() -> None:
    p = Policy.from_yaml(_edit("steer: {method: clamp, features: [5]}", "message: hi"))
    assert p.rules[1].steer is not None
    assert (p.rules[1].steer.method, p.rules[1].steer.strength) == ("subtract", 8.0)


def test_yaml_round_trip() -> None:
    p = Policy.from_yaml(VALID)
    again = Policy.from_yaml(p.to_yaml())
    assert again == p
    assert again.digest == p.digest
    changed = Policy.from_yaml(_edit("threshold: 2.5", "threshold: 2.6"))
    assert changed.digest != p.digest



SHIPPED = sorted(f.stem for f in (Path(__file__).resolve().parents[1] / "policies").glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_policy_round_trips_through_yaml(name: str) -> None:
    # the vLLM worker and the audit trail read a policy back from to_yaml(): defaults written out (a steering
    # entry's scan_action, an always-on one's included) must parse again to the same policy
    p = Policy.from_path(name)
    again = Policy.from_yaml(p.to_yaml(), base_dir=p.base_dir)
    assert again == p and again.digest == p.digest


@pytest.mark.parametrize("trigger", [{"always": True}, {"when": "gate"},
                                     {"when": "gate", "steer": {"scan_action": "flag"}}])
def test_steering_entries_round_trip_through_yaml(trigger: dict[str, Any]) -> None:
    trigger = dict(trigger)
    steer = {"direction": "d.safetensors", **trigger.pop("steer", {})}
    q = Policy.from_dict({"name": "s", "rules": [{"id": "gate", "scope": "input", "threshold": 1.0, "action": "flag",
                                                    "detector": {"kind": "linear", "layer": 0, "weights": "w"}}],
                          "steering": [{"id": "e", **trigger, "steer": steer}]})
    assert Policy.from_yaml(q.to_yaml()) == q


def test_from_path_resolves_relative_paths(tmp_path: Path) -> None:
    f = tmp_path / "pol" / "p.yaml"
    f.parent.mkdir()
    f.write_text(VALID)
    p = Policy.from_path(f)
    assert p.resolve(p.saes["main"].path) == str(f.parent.resolve() / "saes/layer1.sae.pt")
    assert p.resolve("bundled:layer15") == "bundled:layer15"
    assert p.resolve("/abs/x") == "/abs/x"


VALID_KEYS_TOP = "name, version, description, model, saes, score_mode, on_error, refusal"


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        pytest.param(VALID + "colour: red\n", ["colour: unknown key 'colour'", f"valid: {VALID_KEYS_TOP}"],
                     id="unknown-top-key"),
        pytest.param(_edit("    message: \"Blocked.\"", "    message: x\n    severity: high"),
                     ["rules[0].severity: unknown key 'severity'", "valid: id, description, scope, detector"],
                     id="unknown-rule-key"),
        pytest.param(_edit("aggregate: sum", "aggregate: sum\n      pool: max"),
                     ["rules[0].detector.pool: unknown key 'pool'", "valid: kind, sae, features, combine"],
                     id="unknown-detector-key"),
        pytest.param(_edit("method: diffmean}", "method: diffmean, bias: 1}"),
                     ["rules[2].detector.bias: unknown key 'bias'", "valid: kind, layer, weights, method"],
                     id="unknown-linear-detector-key"),
        pytest.param(_edit("{method: clamp, features: [5]}", "{strenght: 4}"),
                     ["rules[1].steer.strenght: unknown key 'strenght'", "valid: method, strength"],
                     id="unknown-steer-key"),
        pytest.param(_edit("{id: 6, weight: -1, label: six}", "{id: 6, wieght: 2}"),
                     ["rules[1].detector.features[1].wieght: unknown key 'wieght'", "valid: id, weight, label"],
                     id="unknown-feature-key"),
        pytest.param(_edit("k: 8,", "k: 8, stride: 2,"),
                     ["saes.main.stride: unknown key 'stride'", "valid: path, layer, k, format, dtype"],
                     id="unknown-sae-key"),
        pytest.param(_edit("action: block", "action: blok"),
                     ["rules[0].action: invalid value 'blok'", "valid: 'flag', 'block' or 'steer'"], id="blok"),
        pytest.param(_edit("scope: input", "scope: inputs"),
                     ["rules[0].scope: invalid value 'inputs'", "valid: 'input', 'output' or 'both'"], id="inputs"),
        pytest.param(_edit("aggregate: sum", "aggregate: median"),
                     ["rules[0].detector.aggregate: invalid value 'median'", "'max', 'mean' or 'sum'"],
                     id="aggregate"),
        pytest.param(_edit("score_mode: watched", "score_mode: fast"),
                     ["score_mode: invalid value 'fast'", "'exact' or 'watched'"], id="score-mode"),
        pytest.param(_edit("on_error: allow", "on_error: ignore"),
                     ["rules[2].on_error: invalid value 'ignore'", "'block', 'flag' or 'allow'"], id="on-error"),
        pytest.param(_edit("kind: linear,", "kind: magic,"),
                     ["rules[2].detector: unknown detector kind 'magic'", "valid: sae_features, linear"],
                     id="detector-kind"),
        pytest.param(_edit("sae: main\n", "sae: other\n"),
                     ["rules[0].detector.sae: unknown SAE id 'other'", "valid: main"], id="unknown-sae-id"),
        pytest.param(_edit("      sae: main\n", ""),
                     ["rules[0].detector.sae: missing required key 'sae'"], id="missing-sae-id"),
        pytest.param(_edit("- id: probe", "- id: harm"),
                     ["rules[2].id: duplicate rule id 'harm'"], id="duplicate-ids"),
        pytest.param(_edit("threshold: 2.5", "threshold: high"),
                     ["rules[0].threshold:", "valid number", "got 'high'"], id="threshold-type"),
        pytest.param(_edit("layer: 1,", "layer: one,"),
                     ["saes.main.layer:", "valid integer", "got 'one'"], id="layer-type"),
        pytest.param(_edit("layer: 1,", "layer: -1,"), ["saes.main.layer:", "greater than or equal to 0"],
                     id="negative-layer"),
        pytest.param(_edit("window: 4", "window: 0"), ["rules[0].detector.window:", "greater than or equal to 1"],
                     id="window-zero"),
        pytest.param(_edit("features: {3: 1.0, 17: 0.5}", "features: []"),
                     ["rules[0].detector.features:", "at least 1"], id="no-features"),
        pytest.param(_edit("    message: \"Blocked.\"", "    message: x\n    steer: {strength: 4}"),
                     ["rules[0].steer: settings given but action is 'block'", "action: steer"],
                     id="steer-settings-with-block"),
        pytest.param(_edit("steer: {method: clamp, features: [5]}", "steer: {method: clamp, scan_action: allow}"),
                     ["rules[1].steer.scan_action: invalid value 'allow'", "valid: 'block' or 'flag'"],
                     id="steer-scan-action"),
        pytest.param("name: x\nrules: []\n", ["rules:", "at least 1"], id="no-rules"),
        pytest.param("- a\n- b\n", ["must be a mapping", "name, version"], id="not-a-mapping"),
        pytest.param(_edit("rules:\n", "rules: [\n"), ["invalid YAML", "line"], id="yaml-syntax"),
    ],
)
def test_bad_policy_messages(yaml_text: str, expected: list[str]) -> None:
    msg = _err(yaml_text)
    assert msg.startswith("bad.yaml: ")
    for part in expected:
        assert part in msg, f"{part!r} not in {msg!r}"


def test_file_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(PolicyError, match=rf"policy file '{missing}' not found"):
        Policy.from_path(missing)


def test_bad_file_names_the_file(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text(_edit("action: block", "action: blok"))
    with pytest.raises(PolicyError, match=rf"^{f}: invalid policy:\n  rules\[0\]\.action"):
        Policy.from_path(f)


def test_check_against_model_and_sae_widths() -> None:
    p = Policy.from_yaml(VALID)
    p.check_against(n_layers=4, sae_widths={"main": 18})  # everything in range: no error
    with pytest.raises(PolicyError) as info:
        p.check_against(n_layers=2, sae_widths={"main": 10})
    msg = str(info.value)
    assert "rules[0].detector.features[1].id: 17 out of range; valid: 0..9 (SAE 'main' has 10 features)" in msg
    assert "rules[2].detector.layer: 2 out of range; valid: 0..1" in msg
    assert "features[0].id: 3" not in msg  # in range: not reported
    with pytest.raises(PolicyError, match=r"saes\.main\.layer: 1 out of range; valid: 0\.\.0"):
        p.check_against(n_layers=1, sae_widths={"main": 100})


def test_check_against_steer_features() -> None:
    p = Policy.from_yaml(_edit("features: [5]}", "features: [50]}"))
    with pytest.raises(PolicyError, match=r"rules\[1\]\.steer\.features\[0\]: 50 out of range; valid: 0\.\.19"):
        p.check_against(n_layers=4, sae_widths={"main": 20})
