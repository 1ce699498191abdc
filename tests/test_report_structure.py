"""The report's modules: no import cycle, and one module per section that obeys the sections' contract."""

import ast
import json
import types
from pathlib import Path

import pytest
from synthetic_runs import DEFAULT_SERIES, write_sweep

import capscale.report
from capscale.report.format import Section, table

REPORT = Path(capscale.report.__file__).parent
SRC = REPORT.parent.parent
# what a section may not import: the page, the data assembly, the renderers, the figures
NOT_FOR_SECTIONS = {
    f"capscale.report.{m}" for m in ("layout", "data", "answers", "build", "html", "markdown", "figures", "command")
}


def _module(name: str) -> bool:
    path = SRC / Path(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _imports() -> dict[str, set[str]]:
    """module → the capscale.report modules it imports (at any depth in the file, lazy imports too)."""
    graph = {}
    for path in REPORT.rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("capscale.report"):
                for alias in node.names:  # `from capscale.report.sections import design` names a module
                    sub = f"{node.module}.{alias.name}"
                    found.add(sub if _module(sub) else node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("capscale.report")}
        graph[name] = found - {name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path (first node repeated at its end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt, [*path, nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            found = visit(module, [module])
            if found:
                return found
    return None


def test_the_cycle_check_finds_a_cycle():
    # the cycle the report once had: layout imported trajectory's section, trajectory layout's helpers
    graph = {"layout": {"trajectory", "format"}, "trajectory": {"layout"}, "format": set()}
    assert _cycle(graph) == ["layout", "trajectory", "layout"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_among_the_report_modules():
    graph = _imports()
    assert {"capscale.report.layout", "capscale.report.sections.q1_width", "capscale.report.data"} <= set(graph)
    assert "capscale.report.sections" in graph["capscale.report.data"]  # the walk sees package imports
    assert _cycle(graph) is None, " → ".join(_cycle(graph))


def test_each_section_imports_no_other_section_nor_the_page():
    from capscale.report.sections import SECTIONS

    graph = _imports()
    names = {m.__name__ for m in SECTIONS}
    assert len(names) == len(SECTIONS)
    for module in SECTIONS:
        deps = graph[module.__name__]
        assert not any(d.startswith("capscale.report.sections") for d in deps), (module.__name__, deps)
        assert not deps & NOT_FOR_SECTIONS, (module.__name__, deps & NOT_FOR_SECTIONS)
    # every module of the package is a registered section (a section file without its line is a mistake)
    files = {p.stem for p in (REPORT / "sections").glob("*.py")} - {"__init__"}
    assert {f"capscale.report.sections.{f}" for f in files} == names


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from capscale.analysis import analyze
    from capscale.report import report_data

    root = write_sweep(
        tmp_path_factory.mktemp("sweep"), series=(DEFAULT_SERIES[0], DEFAULT_SERIES[2]), widths=(32, 64, 128)
    )
    a = analyze(root, n_resamples=100)
    return a, json.loads(json.dumps(report_data(a), allow_nan=False))


def test_each_section_obeys_the_contract(built):
    from capscale.report.figures import FIGURES
    from capscale.report.sections import SECTIONS

    a, d = built
    keys = [m.KEY for m in SECTIONS]
    assert len(set(keys)) == len(keys)
    for module in SECTIONS:
        part = module.data(a)
        # plain JSON values, written to report.json under the section's own key as they are
        assert json.loads(json.dumps(part, allow_nan=False)) == part
        assert d[module.KEY] == part, module.KEY
        figures = getattr(module, "FIGURES", ())
        assert set(figures) <= set(FIGURES), (module.KEY, figures)
        s = module.section(d)  # from report.json's dict alone
        assert s is None or isinstance(s, Section)
        if s is not None:
            assert set(s.figures) <= set(figures), (module.KEY, s.figures)
        if hasattr(module, "answer"):
            ans = module.answer(d)
            assert ans in d["answers"] and set(ans["figures"]) <= set(figures), module.KEY
    answering = [m for m in SECTIONS if hasattr(m, "answer")]
    assert [x["id"] for x in d["answers"]] == [m.answer(d)["id"] for m in answering] == ["q1", "q2", "q3", "q4", "q5"]


def test_adding_a_section_is_one_module_and_one_line(built, monkeypatch):
    from capscale.report import data, layout, report_data
    from capscale.report.verdicts import NOT_MEASURED

    a, _ = built
    extra = types.SimpleNamespace(
        KEY="extra",
        data=lambda a: {"n_runs": len(a.sweep.runs)},
        answer=lambda d: {"id": "extra", "question": "?", "verdict": NOT_MEASURED, "finding": "-", "figures": []},
        section=lambda d: Section("extra", "Extra", [f"{d['extra']['n_runs']} runs"], [], [table("t", [], [])]),
    )
    for module in (data, layout):  # what `from capscale.report.sections import SECTIONS` gives them
        monkeypatch.setattr(module, "SECTIONS", (*module.SECTIONS, extra))
    d = report_data(a)
    assert d["extra"] == {"n_runs": len(a.sweep.runs)} and d["answers"][-1]["id"] == "extra"
    # format 2's keys keep their order; a new section's part follows them, before the answers
    assert list(d)[-3:] == ["extra", "answers", "summary"]
    assert list(d)[:4] == ["format", "format_version", "generated", "sweep"]
    body = layout.sections(d)
    titles = [s.title for s in body]
    assert "Extra" in titles and titles.index("Extra") < titles.index("Reliability: samples per dimension")


def test_q2_names_the_labels_a_pair_shares_once():
    from capscale.report.sections.q2_matched import _names

    pair = {"series_a": "adamw · 780 steps · d_model=96", "series_b": "muon · 780 steps · d_model=96"}
    assert _names(pair) == ("adamw", "muon", " in 780 steps · d_model=96")
    assert _names({"series_a": "adamw", "series_b": "muon"}) == ("adamw", "muon", "")
    steps = {"series_a": "adamw · 140 steps", "series_b": "adamw · 560 steps"}
    assert _names(steps) == ("140 steps", "560 steps", " in adamw")
    same = {"series_a": "adamw · x", "series_b": "adamw · x · y"}  # nothing left of a: full names
    assert _names(same) == ("adamw · x", "adamw · x · y", "")
