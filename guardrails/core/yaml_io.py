"""Strict YAML for policies: duplicate keys refused, YAML 1.2 floats, a node budget against alias bombs, and
files that must be regular (a FIFO or device would hang a reader). Used by :mod:`guardrails.core.policy`."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml


class DuplicateKeyError(yaml.YAMLError):
    """A YAML mapping names the same key twice (YAML would silently keep the last one)."""


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys in a mapping, naming the key and both lines."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # keys merged in with '<<' may be overridden on purpose
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: SafeLoader reports it
                    continue
                line = key_node.start_mark.line + 1
                if first is not None:
                    raise DuplicateKeyError(f"duplicate key {key!r} at line {line} (first at line {first}); "
                                            "each key may appear once per mapping")
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, UniqueKeyLoader.construct_mapping)
# YAML 1.2 floats that YAML 1.1 (PyYAML) reads as strings: 1e9, 1.0e9, 2E-3 (a strict number field would
# otherwise refuse them); 1e400 then reads as inf and is refused as non-finite
UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$|^[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?$"),
    list("-+0123456789."),
)


def regular_file(path: str | os.PathLike[str], where: str) -> Path:
    """``path`` if it is a regular file (a FIFO, device or folder would hang or fail a reader); else PolicyError."""
    from guardrails.core.policy import PolicyError

    p = Path(path)
    try:
        st = p.stat()
    except OSError as exc:
        raise PolicyError(f"{where}: {str(p)!r} not found ({exc.strerror}){shipped_twin_hint(p)}") from None
    import stat

    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else "not a file"
        raise PolicyError(f"{where}: {str(p)!r} is {kind}; valid: a regular file")
    return p


def shipped_twin_hint(p: Path) -> str:
    """A hint when a missing file has a shipped namesake: the usual cause is a shipped policy copied to another
    folder, whose relative ``../calibration/...`` references then point nowhere."""
    from guardrails._data import data_root

    for sub in ("calibration/probes", "calibration/directions"):
        twin = data_root() / sub / p.name
        if twin.is_file():
            return (f"; relative paths resolve against the policy's folder (a shipped policy copied elsewhere?): "
                    f"name the shipped file by its absolute path {str(twin)!r}, or write the copy with "
                    "`guardrails calibrate --policy <shipped name> --out FILE`, which rewrites the paths")
    return ""


MAX_YAML_NODES = 200_000
"""Largest policy, in YAML nodes after alias expansion."""


def too_big(data: Any, limit: int) -> bool:
    """True if walking ``data`` (aliases expanded) visits more than ``limit`` nodes; stops early."""
    stack, seen = [data], 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > limit:
            return True
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


__all__ = ["MAX_YAML_NODES", "DuplicateKeyError", "UniqueKeyLoader", "regular_file", "too_big"]
