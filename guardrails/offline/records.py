"""Calibration records: what a fitted threshold was fitted on (data, model, SAE files by sha256, metrics).

A record is kept in the policy (``calibration:``, written with the policy by :func:`write_calibrated`) and in full
under ``calibration/records/``; the SAE file hashes let a test (and a user) see when a policy's features belong to
another SAE than the one shipped.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from guardrails.core.policy import Policy

if TYPE_CHECKING:
    from guardrails.offline.calibrate import LabeledData


def make_record(
    *, policy: Policy, data: LabeledData, model_name: str, score_mode: str, rule_id: str, threshold: float,
    target: dict[str, float], metrics: dict[str, Any], extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The calibration record kept in the policy and under calibration/records/."""
    saes = {k: {"path": v.path, "layer": v.layer} for k, v in policy.saes.items()}
    for k, spec in policy.saes.items():
        sae_file = sae_weights_file(policy.resolve(spec.path))
        if sae_file is not None:
            saes[k]["sha256"] = hashlib.sha256(sae_file.read_bytes()).hexdigest()
    return {
        "date": _dt.date.today().isoformat(),
        "data": data.path, "data_sha256": data.sha256, "rows": len(data),
        "positives": int(data.labels.sum()), "negatives": int((data.labels == 0).sum()),
        "model": model_name, "saes": saes, "score_mode": score_mode, "rule": rule_id,
        "threshold": threshold, "target": target, "metrics": metrics,
        **({"context": ctx} if (ctx := context_summary(data)) else {}), **(extra or {}),
    }


def context_summary(data: LabeledData) -> dict[str, Any] | None:
    """What came before the rows' user turns when they were scored (``--system``, a row's ``system`` or
    ``messages``): how many rows had any, and the distinct system prompts (the first 3); None for bare rows."""
    if not data.contexts or not any(data.contexts):
        return None
    systems = list(dict.fromkeys(m["content"] for c in data.contexts for m in c if m["role"] == "system"))
    return {"rows_with_context": sum(1 for c in data.contexts if c), "system_prompts": systems[:3],
            "rows_with_earlier_turns": sum(1 for c in data.contexts if any(m["role"] != "system" for m in c))}


def sae_weights_file(ref: str) -> Path | None:
    """The weights file behind an SAE reference (``bundled...``, a folder or a file) whose sha256 a
    calibration record stores; ``None`` where there is none to hash (a hub id, a missing path)."""
    if ref.startswith("bundled"):
        try:
            from guardrails.sae.loaders import resolve_bundled

            ref = str(resolve_bundled(ref))
        except Exception:
            return None
    p = Path(ref)
    if p.is_dir():
        files = sorted(p.glob("*.safetensors"))
        return files[0] if files else None
    return p if p.is_file() else None


def write_record(path: Path, report: dict[str, Any], kept: set[str]) -> None:
    """Write the calibration record ``report`` (``{"policy", "rules", ...}``) to ``path``, keeping the entries of the
    rules in ``kept`` (not calibrated this time) from an earlier record of the same policy there."""
    full: dict[str, Any] = {"policy": report["policy"],
                            "rules": {**_earlier_records(path, report["policy"], kept), **report["rules"]}}
    full.update({k: v for k, v in report.items() if k not in full})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(full, indent=2) + "\n", encoding="utf-8")


def write_calibrated(policy: Policy, report: dict[str, Any], out_path: Path, record_path: Path | None) -> None:
    """Write the calibrated ``policy`` to ``out_path`` and ``report`` (``guardrails calibrate``'s) to ``record_path``:
    the rules calibrated now get calibration entries from their records (threshold, target, data hash, the record's
    path, where discover chose their features); the other rules keep theirs, in the policy and in the record file.
    Relative file references are rebased to the output's folder, and the text is parsed back before it is written."""
    shown = _shown(record_path) if record_path is not None else None
    ids = {r.id for r in policy.rules}
    kept = {rid: e for rid, e in (policy.calibration or {}).items() if rid in ids and rid not in report["rules"]}
    summary = {**kept, **{rid: {"threshold": r["threshold"], "target": r["target"], "data_sha256": r["data_sha256"],
                                "date": r["date"],
                                **({"system_prompts": r["context"]["system_prompts"]} if "context" in r else {}),
                                **({"record": shown} if shown else {}),
                                **({"features_from": f} if (f := features_from(policy, rid)) else {})}
                          for rid, r in report["rules"].items()}}
    policy = policy.model_copy(update={"calibration": summary or None}).rebased(out_path.resolve().parent)
    text = f"# {policy.name}: calibrated with `guardrails calibrate`; " + \
        (f"see {shown}\n" if shown else "no calibration record written\n") + policy.to_yaml()
    Policy.from_yaml(text, source=str(out_path), base_dir=out_path.resolve().parent)  # round trip before writing
    out_path.write_text(text, encoding="utf-8")
    if record_path is not None:
        write_record(record_path, report, set(kept))


def features_from(policy: Policy, rule_id: str) -> dict[str, Any] | None:
    """Where ``guardrails discover`` chose a rule's features (``{"data", "sha256"}``), as its draft recorded."""
    entry = (policy.calibration or {}).get(rule_id)
    got = entry.get("features_from") if isinstance(entry, dict) else None
    return got if isinstance(got, dict) else None


def _shown(path: Path) -> str:
    """A record's path as a policy names it: relative to the working directory when under it."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


def _earlier_records(path: Path, policy_name: str, rule_ids: set[str]) -> dict[str, Any]:
    """The entries of ``rule_ids`` in an existing record of the same policy at ``path`` (rules not calibrated
    this time keep their provenance); nothing when the file is absent, unreadable or another policy's."""
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(old, dict) or old.get("policy") != policy_name or not isinstance(old.get("rules"), dict):
        return {}
    return {rid: e for rid, e in old["rules"].items() if rid in rule_ids}


DEFAULT_TARGET_FPR = 0.01
"""The target of a rule calibrated for the first time without ``--target-fpr`` / ``--target-recall``."""


def _record_entry(policy: Policy, rule_id: str, roots: list[Path]) -> tuple[dict[str, Any], Path] | None:
    """A rule's entry in the record file its calibration entry names, and the folder the record was found from
    (the first of ``roots`` under which the record's relative path exists); None without one."""
    entry = (policy.calibration or {}).get(rule_id)
    if not isinstance(entry, dict) or not isinstance(entry.get("record"), str):
        return None
    for base in roots:
        path = base / entry["record"]
        if path.is_file():
            try:
                got = json.loads(path.read_text(encoding="utf-8"))["rules"][rule_id]
            except (OSError, ValueError, KeyError, TypeError):
                return None
            return (got, base) if isinstance(got, dict) else None
    return None


def _roots(policy: Policy, root: Path | None) -> list[Path]:
    """Where a policy's record paths are looked up: the working directory, the policy's folder, ``root``."""
    return [Path.cwd(), Path(policy.base_dir or "."), *([root] if root else [])]


def recorded_target(policy: Policy, rule_id: str, root: Path | None = None) -> dict[str, float] | None:
    """The target (``{"fpr": x}`` or ``{"recall": x}``) a rule was last calibrated to: its entry in the policy's
    ``calibration``, else the record file that entry names (policies calibrated before v0.3.13), looked up from the
    working directory, the policy's folder and ``root`` (the source tree the shipped records are in); None if
    neither."""
    entry = (policy.calibration or {}).get(rule_id)
    if not isinstance(entry, dict):
        return None
    target = entry.get("target")
    if target is None and (found := _record_entry(policy, rule_id, _roots(policy, root))) is not None:
        target = found[0].get("target")
    if (isinstance(target, dict) and len(target) == 1 and next(iter(target)) in ("fpr", "recall")
            and isinstance(v := next(iter(target.values())), int | float) and 0 <= v <= 1):
        return {str(k): float(x) for k, x in target.items()}
    return None


def recorded_train(policy: Policy, rule_id: str, root: Path | None = None) -> tuple[Path | None, str | None]:
    """The train split a rule's calibration record names (``train_data``: the file the rule's detector was fitted
    on, beside the cal split), looked up as :func:`recorded_target` looks up the record and then from the folder the
    record was found from: ``(path, None)`` when the file is there with the recorded sha256; ``(None, why)`` when the
    record names one that is missing or changed; ``(None, None)`` when no record names one."""
    found = _record_entry(policy, rule_id, _roots(policy, root))
    train = found[0].get("train_data") if found else None
    if not found or not isinstance(train, dict) or not isinstance(train.get("path"), str):
        return None, None
    name, want = train["path"], train.get("sha256")
    for base in dict.fromkeys((found[1], Path.cwd())):
        path = base / name
        if path.is_file():
            if want and hashlib.sha256(path.read_bytes()).hexdigest() != want:
                return None, (f"the train split its calibration record names, {path}, has changed since "
                              f"(sha256 {want[:12]}...)")
            return path, None
    return None, (f"the train split its calibration record names, {name} (sha256 {str(want)[:12]}...), is not here "
                  "(the data files live in the source tree, not the wheel)")
