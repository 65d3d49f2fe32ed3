"""Every Python snippet in README.md and docs/ imports only what its install provides:
the core dependencies, the standard library, the repository's examples/ (the docs say to
run from the repository root), and the extras the snippet names on a line of its own,
``# needs umup_fx[hf]`` (read from the installed package's metadata, so an extra that
lacks a package fails here)."""

from __future__ import annotations

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SNIPPET = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
NEEDS = re.compile(r"^#\s*needs\s+umup_fx\[([\w,\s]+)\]", re.M)
# What `import umup_fx` alone brings, and the repository folder the docs run from.
ALWAYS = {"umup_fx", "examples"}
# Distributions whose import name is not their name, lower-cased with '-' as '_'.
IMPORT_NAMES = {"unit_scaling": "unit_scaling", "pytest_xdist": "xdist"}


def _name(requirement: str) -> str:
    name = re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0).lower().replace("-", "_")
    return IMPORT_NAMES.get(name, name)


def _provided() -> tuple[set[str], dict[str, set[str]]]:
    """(core imports, {extra: imports}) from the installed umup_fx's Requires-Dist."""
    core: set[str] = set()
    extras: dict[str, set[str]] = {}
    nested: dict[str, list[str]] = {}
    for line in metadata.requires("umup_fx") or []:
        requirement, _, marker = line.partition(";")
        extra = re.search(r'extra\s*==\s*"([^"]+)"', marker)
        if extra is None:
            core.add(_name(requirement))
            continue
        target = extras.setdefault(extra.group(1), set())
        self_ref = re.match(r"umup_fx\[([^\]]+)\]", requirement.strip())
        if self_ref:
            nested[extra.group(1)] = [e.strip() for e in self_ref.group(1).split(",")]
        else:
            target.add(_name(requirement))
    for extra, included in nested.items():
        for other in included:
            extras[extra] |= extras.get(other, set())
    return core, extras


def _snippets() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for match in SNIPPET.finditer(text):
            line = text[: match.start()].count("\n") + 1
            found.append((f"{doc.relative_to(ROOT)}:{line}", match.group(1)))
    return found


def _imports(code: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_the_docs_have_python_snippets() -> None:
    assert len(_snippets()) >= 10  # the test reads what it means to read


@pytest.mark.parametrize("where, code", _snippets(), ids=[w for w, _ in _snippets()])
def test_a_snippet_imports_only_what_its_install_provides(where: str, code: str) -> None:
    core, extras = _provided()
    named = {e.strip() for m in NEEDS.finditer(code) for e in m.group(1).split(",")}
    unknown = named - set(extras)
    assert not unknown, f"{where} names extras the package does not have: {sorted(unknown)}"
    allowed = core | ALWAYS | set(sys.stdlib_module_names)
    for extra in named:
        allowed |= extras[extra]
    missing = _imports(code) - allowed
    assert not missing, (
        f"{where} imports {sorted(missing)}, which neither the core dependencies nor the "
        f"extras it names ({sorted(named) or 'none'}) install: add '# needs umup_fx[EXTRA]' "
        "to the snippet, or the package to that extra in pyproject.toml")


def test_an_import_no_extra_provides_is_caught() -> None:
    core, extras = _provided()
    assert "transformers" in extras["hf"] and "transformers" not in core
    assert _imports("import torch\nfrom transformers import Trainer") - core - ALWAYS == {
        "transformers"}
