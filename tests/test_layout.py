"""The house's layering and size rules, read from the source (docs/design.md, 'Layout and layering').

`jobs -> experiments -> pipeline -> {curation, training} -> core`: a package imports only the layers below it;
`curation` and `training` never import each other; nothing imports `jobs`. `bench` sits beside `jobs`: it
may import the library, and nothing but the tests imports it. Library and bench functions stay short
enough to read at a glance.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from conftest import REPO

LIBRARY = ("core", "curation", "training", "pipeline", "experiments")
# What each top-level package may import of this project (itself included).
ALLOWED = {
    "core": {"core"},
    "curation": {"core", "curation"},
    "training": {"core", "training"},
    "pipeline": {"core", "curation", "training", "pipeline"},
    "experiments": {"core", "curation", "training", "pipeline", "experiments"},
    "jobs": {"core", "curation", "training", "pipeline", "experiments", "jobs"},
    "bench": {"core", "curation", "training", "pipeline", "experiments", "bench"},
}
MAX_FUNCTION_LINES = 60


def modules(packages: tuple[str, ...]) -> dict[str, Path]:
    found = {}
    for package in packages:
        for path in sorted((REPO / package).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def project_imports(path: Path, module: str, top_level_only: bool = False) -> set[str]:
    """Every project module `path` imports, anywhere in the file (or at module level only)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join([*package, *([base] if base else [])])
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}
    return {name for name in names if name.split(".")[0] in ALLOWED}


def test_every_package_imports_only_the_layers_below_it():
    wrong = []
    for module, path in modules((*LIBRARY, "jobs", "bench")).items():
        layer = module.split(".")[0]
        for imported in project_imports(path, module):
            if imported.split(".")[0] not in ALLOWED[layer]:
                wrong.append(f"{module} imports {imported}")
    assert not wrong, "\n".join(sorted(wrong))


def test_the_layering_check_catches_a_backwards_import(tmp_path):
    """The check itself: a training module that imports curation is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from curation.encode import DocumentEncoder\n")
    assert "curation.encode" in project_imports(bad, "training.bad")


def test_the_layering_check_catches_the_library_importing_a_bench(tmp_path):
    """Nothing imports `bench`: a library module that reaches for a bench's helper is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("from bench.measure import timed\n")
    imported = project_imports(bad, "core.bad")
    assert "bench.measure" in imported and "bench" not in ALLOWED["core"]


def test_no_import_cycles_between_library_modules():
    graph = {}
    known = modules(LIBRARY)
    for module, path in known.items():
        graph[module] = {name for name in project_imports(path, module, top_level_only=True) if name in known}
    graph = {module: {dep for dep in deps if dep != module and not module.startswith(dep + ".")}
             for module, deps in graph.items()}  # fmt: skip
    state: dict[str, int] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                pytest.fail("import cycle: " + " -> ".join([*trail[trail.index(dep) :], dep]))
            if dep not in state:
                visit(dep, [*trail, dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_library_and_bench_functions_stay_short():
    long = []
    for module, path in modules((*LIBRARY, "bench")).items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{module}.{node.name}: {lines} lines")
    assert not long, "\n".join(long)


OLD_RESOURCE_WORDS = re.compile(
    r"\b(encode_actors|teacher_actors|cpus_per_actor|cpus_per_model|cpus_per_worker|gpus_per_actor|gpus_per_model"
    r"|train_cpus|train_gpus|torch_threads)\b|--(encode-actors|teacher-actors|cpus-per-\w+|gpus-per-\w+|num-workers"
    r"|use-gpu|train-cpus|train-gpus|torch-threads|max-length)\b"
)
RAY_TRAIN_KEYWORDS = re.compile(r"\b(num_workers|use_gpu)=")  # Ray's ScalingConfig keeps its own words


def test_every_config_flag_and_doc_names_resources_one_way():
    """actors, cpus, gpus, threads and dtype everywhere (docs/pipeline.md, "Running a stage on its own"): no
    file of the project spells them another way, and `num_workers`/`use_gpu` appear only as Ray's keywords."""
    found = []
    for path in sorted(REPO.rglob("*")):
        relative = path.relative_to(REPO)
        if relative.parts[0] in {".venv", ".git", "runs", "build"} or relative.parts[:2] == ("docs", "replication"):
            continue
        if not path.is_file() or path.suffix not in {".py", ".md", ".yaml", ".yml"} or path.name == "test_layout.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            stripped = RAY_TRAIN_KEYWORDS.sub("", line)
            if OLD_RESOURCE_WORDS.search(line) or re.search(r"\b(num_workers|use_gpu)\b", stripped):
                found.append(f"{relative}:{number}: {line.strip()}")
    assert not found, "\n".join(found)
