"""uv.lock is what setup.sh installs (`uv sync --frozen`): it must cover pyproject.toml as it is."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def _locked() -> dict[str, dict]:
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    return {canonicalize_name(p["name"]): p for p in lock["package"]}


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _requirements(group: str) -> list[Requirement]:
    project = _project()
    specs = project["dependencies"] if group == "runtime" else project["optional-dependencies"][group]
    return [Requirement(s) for s in specs]


@pytest.mark.parametrize("group", ["runtime", "dev"])
def test_every_dependency_is_locked_within_its_range(group):
    locked = _locked()
    for req in _requirements(group):
        name = canonicalize_name(req.name)
        assert name in locked, f"{req.name} is in pyproject.toml but not in uv.lock: run scripts/lock.sh"
        version = locked[name]["version"]
        assert req.specifier.contains(version, prereleases=True), \
            f"uv.lock has {req.name} {version}, outside pyproject.toml's {req.specifier}: run scripts/lock.sh"


def test_the_lock_records_the_projects_own_requirements():
    """uv checks this itself with --frozen only loosely; a stale lock would install old ranges."""
    me = _locked()["lmgate"]
    meta = me["metadata"]
    recorded = {canonicalize_name(r["name"]): r.get("specifier", "") for r in meta["requires-dist"]}
    for group in ("runtime", "dev"):
        for req in _requirements(group):
            name = canonicalize_name(req.name)
            assert name in recorded, f"uv.lock predates {req.name} in pyproject.toml: run scripts/lock.sh"
            assert set(str(req.specifier).split(",")) == set(recorded[name].split(",")), \
                f"{req.name}: pyproject.toml says {req.specifier!s}, uv.lock was made from {recorded[name]}"
    assert set(meta.get("provides-extras", [])) == set(_project()["optional-dependencies"])


def test_packages_come_from_pypi_with_hashes():
    for name, package in _locked().items():
        if name == "lmgate":
            assert package["source"] == {"editable": "."}
            continue
        assert package["source"] == {"registry": "https://pypi.org/simple"}, name
        files = package.get("wheels", []) + ([package["sdist"]] if "sdist" in package else [])
        assert files and all(re.fullmatch(r"sha256:[0-9a-f]{64}", f["hash"]) for f in files), name


def test_setup_installs_the_lock_frozen():
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert re.search(r"\bsync\b.*--frozen", setup), "setup.sh must install uv.lock as it is"
    assert not re.search(r"pip3?\s+install", setup), "packages come from uv.lock only"
