"""Package layout: no import circles between rvl's modules (function-level imports included)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# source folder -> the package name it installs as (pyproject's package-dir)
PACKAGE_DIRS = {"rvl": "rvl", "nlp": "rvl.nlp", "retrieval": "rvl.retrieval"}


def _module_files() -> dict[str, Path]:
    modules = {}
    for folder, package in PACKAGE_DIRS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """rvl modules that ``module`` imports anywhere in its body (packages' own ``__init__`` re-exports excluded)."""
    found = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            if name in known and name != module:
                found.add(name)
    return found


def test_no_import_circles_between_modules():
    files = _module_files()
    graph = {m: _imports(m, p, set(files)) for m, p in files.items() if p.name != "__init__.py"}
    # packages' __init__ files only re-export (lazily or not); an import of a package counts as none of its modules
    graph = {m: {d for d in deps if files[d].name != "__init__.py"} for m, deps in graph.items()}
    cycles = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for dep in graph.get(node, ()):
                if dep == start:
                    cycles.append(" -> ".join(trail + [start]))
                elif dep not in seen:
                    seen.add(dep)
                    stack.append((dep, trail + [dep]))
    assert not cycles, "import circles:\n" + "\n".join(sorted(set(cycles))[:20])


def test_model_and_demo_live_in_their_packages():
    for name in ("factory", "model", "loss", "heads", "demo_eval", "demo_stages", "demo_report"):
        assert not (ROOT / "rvl" / f"{name}.py").exists(), f"rvl/{name}.py belongs in rvl/model/ or rvl/demo/"
    for name in ("core", "factory", "export", "loss", "heads"):
        assert (ROOT / "rvl" / "model" / f"{name}.py").is_file()
