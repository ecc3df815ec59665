"""The package outside the checkout: shipped policies, probes and records by name; a built wheel that
carries them, installed into a fresh venv and used from another directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from guardrails import Policy, PolicyError
from guardrails._data import policies_dir, shipped_policies, shipped_policy

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.stem for p in (ROOT / "policies").glob("*.yaml"))


def test_shipped_policies_by_name_resolve_their_probes() -> None:
    assert shipped_policies() == SHIPPED and "harmful-requests" in SHIPPED
    for name in SHIPPED:
        policy = Policy.from_path(name)
        assert policy.name == name
        for rule in policy.rules:
            weights = getattr(rule.detector, "weights", None)
            if weights:
                assert weights.startswith("../calibration/probes/")
                assert Path(policy.resolve(weights)).is_file(), (name, weights)
            if rule.categories is not None:  # category heads ship with the probes (v0.3.3)
                head = rule.categories.weights
                assert head.startswith("../calibration/probes/") and Path(policy.resolve(head)).is_file(), (name, head)
        for entry in policy.steering:  # steering directions ship too (calibration/directions)
            d = entry.steer.direction
            if d and not d.startswith("sae:"):
                assert d.startswith("../calibration/directions/") and Path(policy.resolve(d)).is_file(), (name, d)
    assert shipped_policy("harmful-requests.yaml") == policies_dir() / "harmful-requests.yaml"
    assert shipped_policy("../pyproject") is None and shipped_policy("nope") is None


def test_strict_variant_is_the_default_with_its_framing_rule_blocking() -> None:
    """``harmful-requests-strict`` is the default with one action changed: a refit of the default that leaves the
    variant behind (other weights, thresholds, calibration) fails here."""
    default, strict = Policy.from_path("harmful-requests"), Policy.from_path("harmful-requests-strict")
    assert [r.id for r in strict.rules] == [r.id for r in default.rules]
    for d, s in zip(default.rules, strict.rules, strict=True):
        assert s.model_dump(exclude={"action", "description"}) == d.model_dump(exclude={"action", "description"})
        assert s.action == ("block" if d.id == "jailbreak-framing" else d.action)
    assert {r.id: r.action for r in default.rules}["jailbreak-framing"] == "flag"
    assert strict.calibration == default.calibration
    assert strict.model_dump(exclude={"rules", "name", "description", "base_dir"}) == \
        default.model_dump(exclude={"rules", "name", "description", "base_dir"})


def test_every_shipped_calibration_has_a_record_with_held_out_metrics() -> None:
    """Issue 10's calibration record per shipped policy: the record each calibrated rule names carries the data it
    was fitted on by hash, the sources its test split holds out whole, and the test split's metrics per source with
    bootstrap intervals, for the threshold the policy ships."""
    for name in SHIPPED:
        policy = Policy.from_path(name)
        thresholds = {r.id: r.threshold for r in policy.rules}
        for rule_id, entry in (policy.calibration or {}).items():
            record = json.loads((ROOT / entry["record"]).read_text(encoding="utf-8"))["rules"][rule_id]
            assert record["threshold"] == thresholds[rule_id] == entry["threshold"], (name, rule_id)
            assert len(record["data_sha256"]) == 64 and len(record["train_data"]["sha256"]) == 64, (name, rule_id)
            assert record["sources_held_out"], (name, rule_id)
            test = record["metrics"]["test"]
            assert "auroc" in test["ci95"], (name, rule_id)
            held = [s for s in record["sources_held_out"] if s in test["per_source"]]
            assert held and all("ci95" in test["per_source"][s] for s in held), (name, rule_id)


def test_unknown_policy_name_lists_the_shipped_ones(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"shipped policies.*harmful-requests"):
        Policy.from_path("harmful-requestz")
    local = tmp_path / "harmful-requests"  # an existing path wins over a shipped name
    local.mkdir()
    with pytest.raises(PolicyError, match="is not a regular file"):
        Policy.from_path(local)


def test_cli_resolves_shipped_names_from_any_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from guardrails.cli.main import resolve_policy_path

    monkeypatch.chdir(tmp_path)
    assert resolve_policy_path("harmful-requests") == policies_dir() / "harmful-requests.yaml"


def test_setup_maps_every_data_folder() -> None:
    """setup.py lists the data packages the wheel needs, and their folders exist in the repository."""
    text = (ROOT / "setup.py").read_text()
    for pkg, folder in [("guardrails._data.policies", "policies"),
                        ("guardrails._data.calibration.probes", "calibration/probes"),
                        ("guardrails._data.calibration.records", "calibration/records")]:
        assert f'"{pkg}": "{folder}"' in text and (ROOT / folder).is_dir()


def _copy_source(dst: Path) -> None:
    """The files a wheel is built from (not the whole checkout: no build/ or egg-info left in it)."""
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, dst / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "guardrails", dst / "guardrails", ignore=ignore)
    shutil.copytree(ROOT / "policies", dst / "policies", ignore=ignore)
    for sub in ("probes", "records", "directions"):
        shutil.copytree(ROOT / "calibration" / sub, dst / "calibration" / sub, ignore=ignore)


@pytest.mark.slow
@pytest.mark.model
def test_wheel_in_a_fresh_venv_runs_generate_from_another_directory(tmp_path: Path) -> None:
    src, dist, elsewhere = tmp_path / "src", tmp_path / "dist", tmp_path / "elsewhere"
    for d in (src, dist, elsewhere):
        d.mkdir()
    _copy_source(src)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    str(src)], check=True, capture_output=True, text=True, timeout=600)
    wheel = next(dist.glob("sae_guardrails-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in SHIPPED:
        assert f"guardrails/_data/policies/{name}.yaml" in names
    assert "guardrails/_data/calibration/probes/harmful-requests-probe.safetensors" in names
    assert "guardrails/_data/calibration/records/harmful-requests.json" in names
    assert "guardrails/_data/calibration/directions/refusal-l12.safetensors" in names  # harmful-requests-steer
    assert not any(n.startswith("guardrails/_data/") and n.endswith(".py") and not n.endswith("__init__.py")
                   for n in names), "build scripts of the data folders must not travel in the wheel"
    assert any(n.startswith("guardrails/assets/sae/") for n in names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True, text=True, timeout=600)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": ""}
    env.pop("GUARDRAILS_AUDIT_DB", None)
    where = subprocess.run([str(py), "-c", "import guardrails, guardrails._data as d; print(guardrails.__file__); "
                            "print(d.policies_dir())"], cwd=elsewhere, env=env, check=True, capture_output=True,
                           text=True).stdout.split()
    site = str(venv / "lib")
    assert where[0].startswith(site) and where[1].startswith(site), where  # the wheel's copy, not the checkout
    shown = subprocess.run([str(py), "-m", "pip", "show", "-f", "sae-guardrails"], cwd=elsewhere, env=env,
                           check=True, capture_output=True, text=True).stdout
    assert str(venv) in shown and "guardrails/_data/policies/harmful-requests.yaml" in shown
    out = subprocess.run([str(venv / "bin" / "guardrails"), "generate", "What is the capital of France?",
                          "--policy", "harmful-requests", "--max-new-tokens", "6", "--json"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["policy"] == "harmful-requests" and result["blocked"] is False and result["text"].strip()
