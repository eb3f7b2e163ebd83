"""The house rules, checked: what may import what, file sizes, declared dependencies, a design doc that names
every module, and a repository that tests alone (nothing outside it is read)."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CODE_DIRS = ("video2lora", "pipelines", "jobs", "infra")
MAX_LINES = 400  # a file a reader can hold in their head

# import name -> distribution name in pyproject.toml, where they differ
DIST_OF = {"PIL": "pillow", "yaml": "pyyaml", "av": "av", "moto": "moto"}


def py_files(*dirs: str) -> list[Path]:
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py") if "assets" not in p.parts)


def module_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """Every module a file imports (relative imports resolved), at any depth of the file."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_of(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
                out.add(name)
                out |= {f"{name}.{a.name}" for a in node.names}  # `from . import world`
            else:
                out.add(node.module)
    return out


def offenders(files, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    bad = {}
    for f in files:
        hits = sorted(m for m in imports(f) if any(m == p or m.startswith(p + ".") for p in forbidden))
        if hits:
            bad[str(f.relative_to(ROOT))] = hits
    return bad


def test_the_method_imports_no_ray_no_pipelines_and_nothing_of_the_effects_world():
    method = [f for f in py_files("video2lora") if "effects" not in f.relative_to(ROOT).parts]
    assert len(method) > 10
    assert offenders(method, ("ray", "deepspeed", "pipelines", "jobs", "video2lora.effects")) == {}


def test_the_effects_world_imports_the_method_but_no_ray_pipelines_or_jobs():
    world = py_files("video2lora/effects")
    assert offenders(world, ("ray", "deepspeed", "pipelines", "jobs")) == {}
    assert any(m.startswith("video2lora.") and not m.startswith("video2lora.effects") for f in world for m in imports(f))


def test_nothing_imports_from_jobs_and_only_the_training_job_imports_deepspeed():
    assert offenders(py_files("video2lora", "pipelines", "infra"), ("jobs",)) == {}
    users = offenders(py_files(*CODE_DIRS), ("deepspeed",))
    assert users and all(f.startswith("pipelines/train/") for f in users), users


def test_imports_resolve_relative_and_nested(tmp_path):
    """The checker itself: a relative import inside a function is seen and resolved."""
    probe = ROOT / "video2lora" / "effects" / "_layout_probe.py"
    probe.write_text("def f():\n    from ..storage import join\n    from . import world\n")
    try:
        assert {"video2lora.storage", "video2lora.effects.world"} <= imports(probe)
    finally:
        probe.unlink()


def test_every_file_fits_in_a_readers_head():
    long = {str(f.relative_to(ROOT)): n for f in py_files(*CODE_DIRS) if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"over {MAX_LINES} lines: {long}"


def test_every_imported_third_party_package_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    names = {re.split(r"[\[<>=!~ ;]", d, maxsplit=1)[0].lower().replace("_", "-") for d in declared}
    local = {"video2lora", "pipelines", "jobs", "tests", "faults", "conftest", "helpers"}
    local |= {p.stem for p in py_files("jobs")}  # jobs import each other by file name
    missing = {}
    for f in py_files(*CODE_DIRS, "tests"):
        for m in imports(f):
            top = m.split(".")[0]
            if not top or top in local or top in sys.stdlib_module_names or top == "__future__":
                continue
            dist = DIST_OF.get(top, top).lower().replace("_", "-")
            if dist not in names:
                missing.setdefault(dist, str(f.relative_to(ROOT)))
    assert missing == {}, f"imported but not declared in pyproject.toml: {missing}"


def test_design_doc_names_every_module():
    design = (ROOT / "docs" / "DESIGN.md").read_text()
    unnamed = [str(f.relative_to(ROOT)) for f in py_files("video2lora", "pipelines", "jobs")
               if f.name != "__init__.py" and str(f.relative_to(ROOT)) not in design]
    assert unnamed == [], f"docs/DESIGN.md does not show {unnamed}"


@pytest.mark.parametrize("folder", ["tests", ".ci"])
def test_nothing_outside_the_repository_is_read(folder):
    pattern = re.compile(r"\.\./shared|parent\.parent\.parent|[\"']shared[\"']")
    hits = [str(f.relative_to(ROOT)) for f in (ROOT / folder).rglob("*") if f.is_file() and f.suffix in ("", ".py", ".sh")
            and f != Path(__file__) and pattern.search(f.read_text(errors="ignore"))]
    assert hits == []
