"""docs/replication.md against the committed results: its tables are what the results print,
and the post-hoc exponents are the fits of the post-hoc ranks beside them."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
DOC = ROOT / "docs" / "replication.md"

pytestmark = pytest.mark.skipif(not (RESULTS / "report.json").is_file(), reason="no committed results")


def _sections(script: str = "replication_tables.py", results: Path = RESULTS) -> dict[str, str]:
    """What a tables script prints, by section title."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), str(results)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    sections = {}
    for block in out.split("\n## "):
        title, _, body = block.removeprefix("## ").partition("\n")
        sections[title.strip()] = body.strip()
    return sections


def test_every_table_on_the_page_is_printed_from_the_committed_results():
    doc = DOC.read_text()
    sections = _sections()
    assert len(sections) >= 10, list(sections)
    for title, body in sections.items():
        if title == "Reliability":  # one sentence, quoted in the prose below
            continue
        assert body in doc, f"section {title!r} of replication_tables.py is not on the page as printed"
    report = json.loads((RESULTS / "report.json").read_text())
    low, n = len(report["reliability"]["low_nd"]), report["reliability"]["n_aggregates"]
    assert f"{low} of its {n} aggregates" in doc
    assert f"{len(report['runs'])} of the" in doc  # the status line counts the analysed runs


def test_posthoc_betas_are_the_fits_of_the_posthoc_ranks():
    # the script's own fit (scripts/ is not a package: loaded from its file)
    spec = importlib.util.spec_from_file_location("posthoc_ranks", ROOT / "scripts" / "posthoc_ranks.py")
    posthoc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(posthoc)
    stored = pd.read_csv(RESULTS / "posthoc_betas.csv")
    refit = posthoc.fit_ranks(pd.read_csv(RESULTS / "posthoc_ranks.csv"))
    keys = ["series", "site", "bucket", "metric"]
    merged = stored.merge(refit, on=keys, suffixes=("_stored", "_refit"), validate="one_to_one")
    assert len(merged) == len(stored) == len(refit)
    for col in ("beta", "ci_low", "ci_high", "n"):
        np.testing.assert_allclose(merged[f"{col}_stored"], merged[f"{col}_refit"], rtol=1e-5, atol=1e-6)


LONG = RESULTS / "cpu-long"


@pytest.mark.skipif(not (LONG / "report" / "report.json").is_file(), reason="no committed cpu-long results")
def test_the_cpu_long_tables_on_the_page_are_printed_from_its_committed_export():
    sections = _sections("cpu_long_tables.py", LONG)
    doc = DOC.read_text()
    assert len(sections) == 14
    for title, body in sections.items():
        assert body in doc, f"section {title!r} of cpu_long_tables.py is not on the page as printed"
    # the export holds every run of the preset, finished
    from capscale.sweep.spec import load_spec

    names = set(load_spec("cpu-long").runs())
    assert {p.name for p in (LONG / "runs").iterdir()} == names
    assert all(json.loads((LONG / "runs" / n / "status.json").read_text())["status"] == "done" for n in names)


@pytest.mark.skipif(not (LONG / "report" / "report.json").is_file(), reason="no committed cpu-long results")
def test_posthoc_ranks_names_series_as_the_report_does():
    # the design names cpu-long's series by the factors that vary ('adamw · 140 steps · d_model=32');
    # the loader's key alone would add 'n_head=1', and a post-hoc CSV would not join the report
    spec = importlib.util.spec_from_file_location("posthoc_ranks", ROOT / "scripts" / "posthoc_ranks.py")
    posthoc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(posthoc)
    configs = {p.parent.name: json.loads(p.read_text()) for p in (LONG / "runs").glob("*/config.json")}
    keys = posthoc.series_keys(configs)
    report = {r["run_id"]: r["series"] for r in json.loads((LONG / "report" / "report.json").read_text())["runs"]}
    assert set(keys.index) == set(report)
    assert {run: keys.at[run, "series"] for run in report} == report


@pytest.mark.skipif(not (LONG / "report" / "report.json").is_file(), reason="no committed cpu-long results")
def test_the_cpu_long_answer_states_what_its_report_gives():
    doc = DOC.read_text()
    design = json.loads((LONG / "report" / "report.json").read_text())["design"]
    rows = [c for c in design["contrasts"] if (c["site"], c["bucket"], c["metric"]) == ("post", "all", "hard_rank")]
    assert len(rows) == 6 and not any(r["resolved"] for r in rows)

    def fmt(x: float) -> str:
        return f"{x:.2f}".replace("-", "−")

    excluded = sum(bool(r["excludes_reference"]) for r in rows)
    assert f"The paper's gap (0.53) is excluded in {excluded} of 6 cells" in doc
    assert f"(Holm p ≥ {min(r['holm_p'] for r in rows):.3f})" in doc
    mdes, holms = [r["mde"] for r in rows], [r["mde_holm"] for r in rows]
    assert (
        f"{fmt(min(mdes))}–{fmt(max(mdes))} per comparison and {fmt(min(holms))}–{fmt(max(holms))} at Holm's α/6" in doc
    )
    (pool,) = [p for p in design["pooled"] if (p["site"], p["bucket"], p["metric"]) == ("post", "all", "hard_rank")]
    assert f"Δβ_hard = {fmt(pool['diff'])} [{fmt(pool['low'])}, {fmt(pool['high'])}] (MDE {fmt(pool['mde'])}" in doc
