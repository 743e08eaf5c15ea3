"""The imports among fastjepa's modules: no cycle, and the data layer stands on its own floor.

Every ``import`` and ``from ... import`` of a module counts, deferred ones inside functions too
(a factory's deferred import of a backend is still an edge); a package's implicit import of
its ``__init__`` does not."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fastjepa"


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if "kernels" in parts:  # the Triton kernels (a link to kernels/) import no fastjepa module
            continue
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict) -> set[str]:
    """The fastjepa modules that module ``name`` imports."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            targets |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names}
    found = set()
    for target in targets:
        while target not in known and "." in target:
            target = target.rsplit(".", 1)[0]
        if target in known and target != name:
            found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = counter
                counter += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_fastjepa_imports_form_no_cycle():
    graph = import_graph()
    assert "fastjepa.data.loader" in graph and "fastjepa.data.base" in graph["fastjepa.data.pil"]
    assert cycles(graph) == []


def test_the_data_layer_imports_nothing_above_it():
    above = ("fastjepa.config", "fastjepa.models", "fastjepa.train", "fastjepa.step", "fastjepa.helper", "fastjepa.cli")
    for name, targets in import_graph().items():
        if name.startswith("fastjepa.data"):
            wrong = sorted(t for t in targets if t.startswith(above))
            assert not wrong, f"{name} imports {wrong}"


# DESIGN's layers, top to bottom; each imports only its own layer and the ones below. The rest
# (helper, distributed, profiling, flops, errors, utils) are shared utilities of every layer.
LAYERS = (
    ("fastjepa.cli", "fastjepa.__main__", "fastjepa.train", "fastjepa.run", "fastjepa.config", "fastjepa.submit", "fastjepa.plan",
     "fastjepa.info", "fastjepa.eval", "fastjepa.finetune", "fastjepa.plot", "fastjepa.weights"),
    ("fastjepa.step",),
    ("fastjepa.data", "fastjepa.masks", "fastjepa.transforms", "fastjepa.datasets"),
    ("fastjepa.models",),
    ("fastjepa.ops",),
)


def layer_of(module: str) -> int | None:
    for level, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return level
    return None


def test_no_module_imports_from_a_layer_above_its_own():
    upward = []
    for name, targets in import_graph().items():
        for target in targets:
            if layer_of(name) is not None and layer_of(target) is not None and layer_of(target) < layer_of(name):
                upward.append(f"{name} -> {target}")
    assert not upward, upward
    assert layer_of("fastjepa.data.pil") == 2 and layer_of("fastjepa.helper") is None


def test_the_trainer_imports_neither_the_probes_nor_fine_tuning():
    """eval/ and finetune/ stand beside the trainer: only the command line, plot (which draws an
    eval run's results) and finetune (which reads data through eval's splits) reach them."""
    for name, targets in import_graph().items():
        if name.startswith(("fastjepa.eval", "fastjepa.finetune")) or name in ("fastjepa.cli", "fastjepa.plot"):
            continue
        wrong = sorted(t for t in targets if t.startswith(("fastjepa.eval", "fastjepa.finetune")))
        assert not wrong, f"{name} imports {wrong}"
    assert not any(t.startswith("fastjepa.finetune") for name, targets in import_graph().items() if name.startswith("fastjepa.eval")
                   for t in targets)
