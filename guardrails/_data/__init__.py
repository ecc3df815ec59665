"""Data shipped with the package: the policies, their probes and calibration records.

In the repository they live in the top-level ``policies/`` and ``calibration/{probes,records}/``
folders; the wheel carries them as ``guardrails/_data/policies/`` and
``guardrails/_data/calibration/{probes,records}/`` (``setup.py`` maps the folders), so a policy's
relative reference ``../calibration/probes/<file>`` resolves the same way in both.
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent
_REPO = _HERE.parents[1]


def data_root() -> Path:
    """The folder holding ``policies/`` and ``calibration/``: the installed package's, else the repository's."""
    return _HERE if (_HERE / "policies").is_dir() else _REPO


def policies_dir() -> Path:
    return data_root() / "policies"


def shipped_policies() -> list[str]:
    """Names of the shipped policies (``harmful-requests``, ...)."""
    folder = policies_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def shipped_policy(name: str) -> Path | None:
    """The file of a shipped policy by name (with or without ``.yaml``), or None."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        return None
    path = policies_dir() / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    return path if path.is_file() else None


def shipped_direction(name: str) -> Path | None:
    """A shipped steering direction by file name (``refusal-l12`` or ``refusal-l12.safetensors``), or None."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        return None
    folder = data_root() / "calibration" / "directions"
    path = folder / (name if name.endswith(".safetensors") else f"{name}.safetensors")
    return path if path.is_file() else None


def shipped_directions() -> list[str]:
    """Names of the shipped steering directions (``refusal-l12``, ``french-l9``, ...)."""
    folder = data_root() / "calibration" / "directions"
    return sorted(p.stem for p in folder.glob("*.safetensors")) if folder.is_dir() else []


__all__ = ["data_root", "policies_dir", "shipped_direction", "shipped_directions", "shipped_policies", "shipped_policy"]
