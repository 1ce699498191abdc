"""The report's modules: no import cycle, and sections that depend on no other section."""

import ast
import importlib
from pathlib import Path

import capscale.report

REPORT = Path(capscale.report.__file__).parent


def _imports() -> dict[str, set[str]]:
    """module → the capscale.report modules it imports (at any depth in the file, lazy imports too)."""
    graph = {}
    for path in REPORT.rglob("*.py"):
        rel = path.relative_to(REPORT.parent.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("capscale.report"):
                for alias in node.names:  # `from capscale.report.sections import design` names a module
                    sub = f"{node.module}.{alias.name}"
                    found.add(
                        sub
                        if (REPORT.parent.parent / Path(*sub.split("."))).with_suffix(".py").exists()
                        else node.module
                    )
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("capscale.report")}
        graph[name] = found - {name}
    return graph


def test_no_import_cycle_among_the_report_modules():
    graph = _imports()
    assert "capscale.report.trajectory" in graph and "capscale.report.layout" in graph
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in graph.get(node, ()):
            assert state.get(nxt) != 1, " → ".join([*path, nxt])
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_each_section_owns_its_part_and_imports_no_other_section():
    from capscale.report.sections import SECTIONS

    graph = _imports()
    keys = [m.KEY for m in SECTIONS]
    assert len(set(keys)) == len(keys)
    for module in SECTIONS:
        assert callable(module.data) and callable(module.section)
        deps = graph[module.__name__]
        assert not any(d.startswith("capscale.report.sections") for d in deps), (module.__name__, deps)
        assert "capscale.report.layout" not in deps and "capscale.report.data" not in deps
        importlib.import_module(module.__name__)
