"""Packaging beyond pyproject.toml: the shipped data folders become packages of the wheel.

``policies/`` -> ``guardrails/_data/policies``, ``calibration/{probes,records,directions}`` ->
``guardrails/_data/calibration/...``: the repository keeps its layout, the wheel carries the data, and a
policy's ``../calibration/probes/...`` (or ``../calibration/directions/...``) reference resolves in both
(see ``guardrails/_data``). Only data files travel: the scripts that build the directions stay in the
repository.
"""

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

DATA = {
    "guardrails._data.policies": "policies",
    "guardrails._data.calibration.probes": "calibration/probes",
    "guardrails._data.calibration.records": "calibration/records",
    "guardrails._data.calibration.directions": "calibration/directions",
}


class DataOnly(build_py):
    """The mapped data folders carry no Python modules (calibration/directions holds build scripts)."""

    def find_package_modules(self, package, package_dir):  # type: ignore[no-untyped-def]
        return [] if package in DATA else super().find_package_modules(package, package_dir)


# the bundled SAE's folders hold data only (no __init__.py): named here so setuptools does not warn that they would be
# left out (their files travel by pyproject's package-data "assets/**/*" either way)
ASSETS = ["guardrails.assets", "guardrails.assets.sae"]
setup(packages=[*find_packages(include=["guardrails*"]), *ASSETS, *DATA], package_dir=DATA,
      cmdclass={"build_py": DataOnly})
