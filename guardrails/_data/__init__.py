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


def _directions_dir() -> Path:
    return data_root() / "calibration" / "directions"


def _names(folder: Path, suffix: str) -> list[str]:
    return sorted(p.stem for p in folder.glob(f"*{suffix}")) if folder.is_dir() else []


def _shipped(folder: Path, name: str, suffixes: tuple[str, ...]) -> Path | None:
    """``folder``'s file ``name`` (given with one of ``suffixes`` or none: the first), or None; a name with a
    folder part or a leading dot is no shipped file."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        return None
    path = folder / (name if name.endswith(suffixes) else f"{name}{suffixes[0]}")
    return path if path.is_file() else None


def shipped_policies() -> list[str]:
    """Names of the shipped policies (``harmful-requests``, ...)."""
    return _names(policies_dir(), ".yaml")


def shipped_policy(name: str) -> Path | None:
    """The file of a shipped policy by name (with or without ``.yaml``), or None."""
    return _shipped(policies_dir(), name, (".yaml", ".yml"))


def shipped_direction(name: str) -> Path | None:
    """A shipped steering direction by file name (``refusal-l12`` or ``refusal-l12.safetensors``), or None."""
    return _shipped(_directions_dir(), name, (".safetensors",))


def shipped_directions() -> list[str]:
    """Names of the shipped steering directions (``refusal-l12``, ``french-l9``, ...)."""
    return _names(_directions_dir(), ".safetensors")


__all__ = ["data_root", "policies_dir", "shipped_direction", "shipped_directions", "shipped_policies", "shipped_policy"]
