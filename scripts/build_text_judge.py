"""Fit the offline text judge (TF-IDF + logistic regression, ``guardrails.offline.text_judge``) on the training
splits, pick its cut on the calibration split and write ``calibration/probes/text-judge.safetensors``.

    python scripts/build_text_judge.py

Prints one JSON object: the file written, the vocabulary size, the cut and the calibration-split rates.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from guardrails.offline.text_judge import CAL_FILES, TRAIN_FILES, artifact_stem, fit  # noqa: E402


def main() -> None:
    data = ROOT / "calibration" / "data"
    judge = fit([data / f for f in TRAIN_FILES], [data / f for f in CAL_FILES])
    print(json.dumps({"wrote": str(judge.save(artifact_stem())), "terms": len(judge.vocabulary), "cut": judge.cut,
                      **{k: v for k, v in (judge.meta or {}).items() if k.startswith("cal_")}}))


if __name__ == "__main__":
    main()
