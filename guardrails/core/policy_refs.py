"""A policy's file references (SAE paths, probe weights, direction files, the audit db) and how they move with
the policy file: relative ones resolve against the policy's folder (:meth:`Policy.resolve`), so a policy written to
another folder needs them rewritten (:func:`rebased`; ``guardrails calibrate --out`` does it). Torch-free.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from guardrails.core.policy import Policy

NOT_FILES = ("bundled", "hf://", "sae:")
"""Reference prefixes that name no file next to the policy: the bundled SAE, a hub repo, an SAE feature."""


def is_local_ref(ref: str) -> bool:
    """A reference that resolves against the policy's folder: relative, and none of :data:`NOT_FILES`."""
    return not (ref.startswith(NOT_FILES) or os.path.isabs(ref))


def rebased(policy: Policy, base_dir: str | os.PathLike[str]) -> Policy:
    """The same policy for a file written to ``base_dir``: every relative file reference rewritten to name the same
    file from there: relative when the file is inside ``base_dir``, absolute otherwise. A policy with no folder of
    its own is returned with ``base_dir`` set and its references as they are."""
    new = Path(base_dir).resolve()
    if policy.base_dir is not None and Path(policy.base_dir).resolve() == new:
        return policy
    old = Path(policy.base_dir).resolve() if policy.base_dir is not None else None

    def fix(ref: str) -> str:
        if old is None or not is_local_ref(ref):
            return ref
        target = Path(os.path.normpath(old / ref))
        return target.relative_to(new).as_posix() if target.is_relative_to(new) else str(target)

    def fix_detector(det: dict[str, Any]) -> None:
        if "weights" in det:
            det["weights"] = fix(det["weights"])
        for m in det.get("members", []):
            fix_detector(m["detector"])

    data = policy.model_dump(mode="json", exclude_none=True, exclude={"base_dir"})
    for spec in data.get("saes", {}).values():
        spec["path"] = fix(spec["path"])
    for rule in [*data["rules"], *data.get("steering", [])]:
        if "detector" in rule:
            fix_detector(rule["detector"])
        if (rule.get("categories") or {}).get("weights"):
            rule["categories"]["weights"] = fix(rule["categories"]["weights"])
        if (rule.get("steer") or {}).get("direction"):
            rule["steer"]["direction"] = fix(rule["steer"]["direction"])
    if (data.get("audit") or {}).get("db"):
        data["audit"]["db"] = fix(data["audit"]["db"])
    return type(policy).from_dict(data, source=f"{policy.name} rebased to {new}", base_dir=new)
