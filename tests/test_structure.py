"""The code base's own rules, checked on its source: small functions, every collective behind the
guards module (each with a deadline), no pointer to files outside the repository, and a README
whose "Repository layout" matches the package tree."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CODE = ("hf_striped", "kernels", "patches", "scripts")
COMMUNICATION = {"all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
                 "broadcast_object_list", "barrier", "monitored_barrier", "reduce", "reduce_scatter",
                 "reduce_scatter_tensor", "gather", "scatter", "all_to_all", "all_to_all_single", "send", "recv",
                 "isend", "irecv", "batch_isend_irecv", "P2POp"}


def _sources():
    files = [p for d in CODE for p in sorted((ROOT / d).rglob("*.py"))]
    if not files:
        pytest.skip("no source checkout next to the tests")
    return files


def test_no_function_is_longer_than_80_lines():
    long = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert not long, "functions over 80 lines: " + ", ".join(long)


def test_every_collective_goes_through_the_guards_module():
    guards = ROOT / "hf_striped" / "core" / "guards.py"
    raw = []
    for path in _sources():
        if path == guards:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr in COMMUNICATION and isinstance(node.value, ast.Name)
                    and node.value.id == "dist"):
                raw.append(f"{path.relative_to(ROOT)}:{node.lineno} dist.{node.attr}")
    assert not raw, "raw torch.distributed communication outside hf_striped/core/guards.py: " + ", ".join(raw)


def test_nothing_points_outside_the_repository():
    found = []
    for path in [*_sources(), *sorted((ROOT / "tests").glob("*.py")), ROOT / "README.md", ROOT / "SECURITY.md",
                 ROOT / "pyproject.toml", *sorted((ROOT / "docs").glob("*.md"))]:
        if path == Path(__file__).resolve():
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"DESIGN\.md|\.\./shared|design card", line):
                found.append(f"{path.relative_to(ROOT)}:{i}")
    assert not found, "references to documents outside the repository: " + ", ".join(found)


def test_readme_repository_layout_matches_the_package_tree():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Repository layout", 1)[1].split("\n## ", 1)[0]
    modules = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "hf_striped").rglob("*.py")
                     if p.name != "__init__.py")
    missing = [m for m in modules if m.split("/")[-1] not in section]
    assert not missing, f"README 'Repository layout' does not list {missing}"
    for folder in ("hf_striped/core", "hf_striped/integration", "hf_striped/training", "hf_striped/tools",
                   "kernels", "patches", "model_cards", "scripts", "tests", "docs"):
        assert (ROOT / folder).is_dir() and folder.split("/")[-1] in section, folder
