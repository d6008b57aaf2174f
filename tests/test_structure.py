"""The code's shape, checked: no import circle in the library, one atomic file writer, one training step."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIBRARY = REPO / "hbt_accel"


def _module_name(path: Path) -> str:
    name = ".".join(path.relative_to(REPO).with_suffix("").parts)
    return name.removesuffix(".__init__")


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Library modules that `path` imports anywhere (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found & modules


def import_graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in LIBRARY.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        # a submodule importing its own package is how Python packages work, not a circle
        graph[name] = {t for t in _imports(path, set(paths)) if t != name and not name.startswith(t + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target, path + [target])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle_in_the_library():
    graph = import_graph()
    assert "hbt_accel.training.run" in graph and "hbt_accel.models.dual_encoder" in graph["hbt_accel.training.run"]
    assert find_cycle(graph) is None


def test_files_are_renamed_into_place_only_by_the_atomic_writer_and_the_folder_builders():
    """`os.replace`/`.rename` make a write atomic; files go through hbt_accel.atomic, folders are staged by the
    model save, the embedded-model build, the checkpoint save and the corpus store conversion."""
    renaming = set()
    for path in [*LIBRARY.rglob("*.py"), *(REPO / "benchmarks").glob("*.py"), *(REPO / "recipes").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and _renames(node):
                renaming.add(path.relative_to(REPO).as_posix())
    assert renaming == {
        "hbt_accel/atomic.py",
        "hbt_accel/models/dual_encoder.py",
        "hbt_accel/models/bundled_e5.py",
        "hbt_accel/training/checkpoints.py",
        "hbt_accel/data/cache.py",
    }


def _renames(call: ast.Call) -> bool:
    """os.replace / os.rename, `path.rename(target)`, `path.replace(target)` (str.replace takes two arguments)."""
    function = call.func
    if not isinstance(function, ast.Attribute) or function.attr not in ("replace", "rename"):
        return False
    if isinstance(function.value, ast.Name) and function.value.id == "os":
        return True
    if isinstance(function.value, ast.Name) and function.value.id == "dataclasses":
        return False  # dataclasses.replace(instance, **changes) makes a new object
    return function.attr == "rename" or len(call.args) == 1


def test_the_speed_benchmark_has_no_training_step_of_its_own():
    source = (REPO / "benchmarks" / "train_speed.py").read_text()
    assert "train_step(" in source
    for own_step in (".backward(", "optimizer.step", "InfoNCELoss", "autocast"):
        assert own_step not in source, own_step


# The import direction (README, "Layout"; docs/design.md): lowest first, a module imports from its own layer or a
# lower one. models and data share the bottom; errors, atomic and distributed are below everything.
LAYERS = (
    ("hbt_accel", "hbt_accel.errors", "hbt_accel.atomic", "hbt_accel.distributed"),
    ("hbt_accel.models", "hbt_accel.data"),
    ("hbt_accel.config",),
    ("hbt_accel.run_record",),
    ("hbt_accel.evaluation",),
    ("hbt_accel.publishing",),
    ("hbt_accel.training",),
    ("hbt_accel.sweeps",),
)
SHARED_TOP_LEVEL = {"__init__.py", "atomic.py", "config.py", "distributed.py", "errors.py", "run_record.py"}


def layer_of(module: str) -> int:
    """The layer of the longest prefix in LAYERS that names `module` or one of its packages."""
    found = [
        (len(prefix), level)
        for level, prefixes in enumerate(LAYERS)
        for prefix in prefixes
        if module == prefix or module.startswith(prefix + ".")
    ]
    assert found, f"{module} is in no layer of LAYERS"
    return max(found)[1]


def test_layer_of_reads_the_longest_prefix():
    assert layer_of("hbt_accel") == 0 and layer_of("hbt_accel.errors") == 0
    assert layer_of("hbt_accel.evaluation.hf_metric.lareqa_grid") == 4 and layer_of("hbt_accel.training.run") == 6


def test_imports_go_one_way_through_the_layers():
    upward = [
        f"{source} -> {target}"
        for source, targets in import_graph().items()
        for target in targets
        if layer_of(target) > layer_of(source)
    ]
    assert upward == []


def test_the_top_level_holds_only_the_shared_modules():
    assert {p.name for p in LIBRARY.glob("*.py")} == SHARED_TOP_LEVEL


def test_no_docstring_points_outside_the_repository():
    assert [p for p in LIBRARY.rglob("*.py") if "shared/notes" in p.read_text()] == []


def test_every_package_is_listed_for_the_wheel():
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {_module_name(p.parent / "__init__.py") for p in LIBRARY.rglob("__init__.py")}
    assert listed == found | {"hbt_accel.recipes"}
