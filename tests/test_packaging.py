"""The package as users install it: every source folder in the distribution, the version
in one place, the type marker, and (where CI installed the wheel) no import from the
source tree by accident.

`.ci/run` builds the sdist and the wheel, installs the wheel into a fresh venv and runs
this suite against it with ``UMUP_FX_TEST_INSTALLED=wheel``; in a developer's editable
install the wheel-only checks skip, saying so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import umup_fx

ROOT = Path(__file__).resolve().parents[1]
# Source folders and where they install: passes/ lands as umup_fx/passes.
SOURCE_PACKAGES = {"umup_fx": "umup_fx", "passes": "umup_fx/passes"}


def _from_source_tree() -> bool:
    """An editable install (or the source tree on sys.path): umup_fx is imported from here."""
    return (ROOT / "umup_fx") in Path(umup_fx.__file__).resolve().parents


def _installed_distribution() -> metadata.Distribution:
    """The distribution the imported umup_fx came from (not an egg-info lying in the tree)."""
    site = str(Path(umup_fx.__file__).resolve().parents[1])
    found = list(metadata.distributions(name="umup_fx", path=[site]))
    assert len(found) == 1, f"{len(found)} umup_fx distributions in {site}"
    return found[0]


def _source_modules() -> dict[str, set[str]]:
    """Each source folder holding .py files -> the installed paths of those files."""
    folders: dict[str, set[str]] = {}
    for src, dst in SOURCE_PACKAGES.items():
        for py in (ROOT / src).rglob("*.py"):
            rel = py.relative_to(ROOT / src)
            folder = (Path(dst) / rel.parent).as_posix()
            folders.setdefault(folder, set()).add((Path(dst) / rel).as_posix())
    return folders


def _wheel_only() -> None:
    if _from_source_tree():
        pytest.skip("editable install: the files come from the source tree; CI runs this "
                    "against the built wheel (.ci/run)")


def test_every_source_folder_is_in_the_installed_package() -> None:
    _wheel_only()
    installed = {str(f) for f in _installed_distribution().files or ()}
    missing = {folder: sorted(files - installed)
               for folder, files in _source_modules().items() if files - installed}
    assert not missing, (
        f"source folders whose modules the installed package lacks: {missing}; setup.py's "
        "discovery needs an __init__.py in each package folder")


def test_the_suite_imports_the_installed_package_not_the_source_tree() -> None:
    if os.environ.get("UMUP_FX_TEST_INSTALLED") != "wheel":
        pytest.skip("set by .ci/run, which installs the wheel")
    assert not _from_source_tree(), umup_fx.__file__
    direct_url = json.loads(_installed_distribution().read_text("direct_url.json") or "{}")
    assert not direct_url.get("dir_info", {}).get("editable"), direct_url
    from umup_fx import passes

    assert (ROOT / "passes") not in Path(passes.__file__).resolve().parents


def test_version_is_one_value_everywhere() -> None:
    if not _from_source_tree():
        assert umup_fx.__version__ == _installed_distribution().version
    run = subprocess.run([sys.executable, "-m", "umup_fx", "--version"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == f"umup_fx {umup_fx.__version__}"


def test_the_package_says_it_is_typed() -> None:
    assert (Path(umup_fx.__file__).parent / "py.typed").is_file()
