"""Packaging beyond pyproject.toml: the shipped data folders become packages of the wheel.

``policies/`` -> ``guardrails/_data/policies``, ``calibration/probes`` and ``calibration/records`` ->
``guardrails/_data/calibration/...``: the repository keeps its layout, the wheel carries the data, and a
policy's ``../calibration/probes/...`` reference resolves in both (see ``guardrails/_data``).
"""

from setuptools import find_packages, setup

DATA = {
    "guardrails._data.policies": "policies",
    "guardrails._data.calibration.probes": "calibration/probes",
    "guardrails._data.calibration.records": "calibration/records",
}

setup(packages=[*find_packages(include=["guardrails*"]), *DATA], package_dir=DATA)
