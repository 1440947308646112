"""No import cycles between the project's modules at module level (imports
inside functions are allowed: Celery tasks import their services that way)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, module: str) -> set[str]:
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.parse(path.read_text()).body:  # module level only
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def project_graph() -> dict[str, set[str]]:
    paths = [
        p
        for top in ("apps", "config")
        for p in (ROOT / top).rglob("*.py")
        if "tests" not in p.parts and "migrations" not in p.parts
    ]
    modules = {_module_name(p): p for p in paths}
    return {name: _imports(path, name) & modules.keys() - {name} for name, path in modules.items()}


def test_project_modules_import_no_cycle():
    graph = project_graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep) :] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_graph_sees_real_imports():
    graph = project_graph()
    assert "apps.realtime.events" in graph["apps.realtime.consumers"]
    assert "apps.pipeline.tasks" in graph["apps.pipeline.services"]
    assert "apps.pipeline.services" not in graph["apps.pipeline.tasks"]
