#!/usr/bin/env python3
"""Write ``policies/harmful-requests-strict.yaml`` from ``policies/harmful-requests.yaml``: the same policy with its
``jailbreak-framing`` rule blocking instead of flagging (v0.3.13). Rerun after refitting or recalibrating the default;
``tests/test_packaging.py::test_strict_variant_is_the_default_with_its_framing_rule_blocking`` fails until then.

    python calibration/selection/strict_policy.py
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from guardrails.core.policy import Policy  # noqa: E402

HEADER = ("# harmful-requests-strict: harmful-requests with its jailbreak-framing rule blocking instead of flagging\n"
          "# (the same detectors and thresholds; written by calibration/selection/strict_policy.py; calibration\n"
          "# record: calibration/records/harmful-requests.json)\n")
DESCRIPTION = ("Blocks harmful requests at the prompt like harmful-requests, and also blocks jailbreak templates "
               "(personas, role-play, 'developer mode') whatever they wrap, benign requests included.")


def main() -> None:
    src = ROOT / "policies" / "harmful-requests.yaml"
    out = ROOT / "policies" / "harmful-requests-strict.yaml"
    default = Policy.from_path(src)
    rules = [r.model_copy(update={"action": "block", "description": f"{r.description}; blocks in this variant"})
             if r.id == "jailbreak-framing" else r for r in default.rules]
    strict = default.model_copy(update={"name": "harmful-requests-strict", "description": DESCRIPTION, "rules": rules})
    text = HEADER + strict.to_yaml()
    Policy.from_yaml(text, source=str(out), base_dir=out.parent)  # round trip before writing
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
