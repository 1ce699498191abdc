"""Report sections beyond the paper: the capacity law (shown when the design varies more than
width) and plasticity (shown when the sweep holds plasticity results), from planted run directories."""

import json
import math

import numpy as np
import pytest
from synthetic_runs import DEFAULT_SERIES, WIDTHS, write_sweep
from test_law import PLANTED, write_planted

from capscale.analysis import analyze
from capscale.report import data as report_module
from capscale.report.data import report_data
from capscale.report.sections import dormant as dormant_section
from capscale.report.sections import law as law_section
from capscale.report.sections import plasticity as plasticity_section

SLOPE = -0.2  # planted: auc_new = 3 + SLOPE · log R2 + 0.5 · pretraining loss + noise


def _plant_plasticity(root, a, rng_seed=1):
    """plasticity.json for every run of the planted sweep, with a planted relation to its aggregate."""
    rng = np.random.default_rng(rng_seed)
    post = a.points[(a.points.site == "post") & (a.points.bucket == "all")].set_index("run_id")
    for r in a.sweep.runs.itertuples():
        auc = 3 + SLOPE * math.log(post.loc[r.run_id, "hard_rank"]) + 0.5 * r.final_val_loss + rng.normal(0, 0.01)
        out = root / "plasticity" / "runs" / r.run_id
        out.mkdir(parents=True)
        summary = {
            "run_id": r.run_id,
            "from_run": f"/elsewhere/{r.run_id}",  # moved since: joined by the run directory's name
            "steps": 8,
            "label": r.label,
            "seed": int(r.seed),
            "ffn_width": int(r.width),
            "val_loss_new_0": auc + 0.4,
            "val_loss_new_k": auc - 0.4,
            "adaptation": 0.8,
            "auc_new": auc,
            "forgetting": 0.1,
        }
        (out / "plasticity.json").write_text(json.dumps(summary))
        (out / "config.json").write_text(json.dumps({"plasticity": {"data_description": "text(planted)"}}))


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = write_planted(tmp_path_factory.mktemp("beyond"))
    a = analyze(root, n_resamples=100)
    _plant_plasticity(root, a)
    return a, report_data(a)


def test_law_section_recovers_the_planted_exponents(planted):
    _, d = planted
    q = d["law"]
    assert q["shown"] and q["factors"] == ["ffn", "d_model", "tokens"] and q["fixed"] == {"depth": 1.0}
    assert q["n_runs"] == 96 and q["n_clusters"] == 4 and q["df"] == 3 and q["cluster"] == "seed"
    coef = {(r["variable"], r["label"], r["term"]): r for r in q["coef"]}
    for var, kind in (("soft_rank", "soft"), ("hard_rank", "hard"), ("tail_hard_rank", "tail")):
        for label, exps in PLANTED.items():
            for term, want in zip(("ffn", "d_model", "tokens"), exps[kind]):
                r = coef[(var, label, term)]
                assert r["ci_low"] <= want <= r["ci_high"] and abs(r["estimate"] - want) < 0.05, (var, label, term)
        diff = coef[(var, "muon − adamw", "ffn")]
        assert diff["ci_low"] <= PLANTED["muon"][kind][0] - PLANTED["adamw"][kind][0] <= diff["ci_high"]
    # held out: a log-linear truth is predicted to the order of the seed spread
    assert len(q["held_out"]) == 8 and all(r["ratio"] < 2 for r in q["held_out"])
    assert len(q["held_out_cells"]) == 4 * 2 * 12
    assert {r["label"] for r in q["loss"]} == {"adamw", "muon"}
    ex = q["extrapolation"]
    assert ex["target"]["d_model"] == 768 and ex["max_factor"] > 10
    assert all(r["above_width"] == (r["variable"] != "asymmetry" and r["value"] > r["ffn"]) for r in ex["rows"])


def test_law_section_renders_from_report_json_alone(planted):
    _, d = planted
    sec = law_section.section(json.loads(json.dumps(d)))  # exactly what report.json holds
    assert sec.anchor == "law"
    coef, held, loss, paper, cells = sec.tables
    assert coef.headers[:3] == ["variable", "optimizer", "level c"] and "β_tokens" in coef.headers
    assert len(coef.rows) == 4 * 3  # 4 variables × (adamw, muon, muon − adamw)
    assert "EXTRAPOLATION" in paper.caption and len(paper.rows) == 2 * 8
    row = next(r for r in coef.rows if r[:2] == ["hard rank R2", "muon"])
    r = next(r for r in d["law"]["coef"] if (r["variable"], r["label"], r["term"]) == ("hard_rank", "muon", "ffn"))
    assert row[coef.headers.index("β_ffn")] == f"{r['estimate']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"


def test_plasticity_section_recovers_a_planted_relation(planted):
    a, d = planted
    q = d["plasticity"]
    assert q["shown"] and q["n_matched"] == 96 and q["n_seeds"] == 4 and q["data"] == ["text(planted)"]
    auc = {r["kind"]: r for r in q["relation"] if r["y"] == "auc_new"}
    for kind in ("within", "across"):
        assert auc[kind]["ci_low"] <= SLOPE <= auc[kind]["ci_high"] < 0, auc[kind]
    sec = plasticity_section.section(d)
    assert sec.anchor == "plasticity" and sec.tables[2].collapsed and "4 seeds" in sec.tables[0].caption


def test_width_only_sweep_shows_neither_and_keeps_report_json(tmp_path, monkeypatch):
    """A sweep varying FFN width alone: the two keys say why they are absent, no section is drawn,
    and every other key of report.json is as it was without the two sections."""
    root = write_sweep(tmp_path / "sw", series=(DEFAULT_SERIES[2],), widths=WIDTHS)
    a = analyze(root, n_resamples=100)
    d = report_data(a)
    assert d["law"]["shown"] is False and "FFN width only" in d["law"]["why"] and set(d["law"]) == {"shown", "why"}
    assert d["plasticity"] == {"shown": False, "why": f"no plasticity.json below {root}"}
    assert d["dormant"]["shown"] is False  # spectra without the column
    assert law_section.section(d) is None and plasticity_section.section(d) is None
    assert dormant_section.section(d) is None
    ours = (law_section, plasticity_section, dormant_section)
    without = tuple(m for m in report_module.SECTIONS if m not in ours)
    monkeypatch.setattr(report_module, "SECTIONS", without)
    before = report_data(a)
    for k in ("generated",):
        before.pop(k, None), d.pop(k, None)
    assert {k: v for k, v in d.items() if k not in ("law", "plasticity", "dormant")} == before


def test_dormant_section_counts_planted_dead_units(tmp_path):
    """dormant_frac planted per width at the runs' last windows (0 before): the section gives it
    per width over seeds, and its change over the run."""
    import pandas as pd

    root = write_sweep(tmp_path / "sw", series=(DEFAULT_SERIES[2],), widths=WIDTHS)
    for run in (root / "runs").iterdir():
        df = pd.read_parquet(run / "spectra.parquet")
        width = int(df["dim"].iloc[0])
        last = df["step"] == df["step"].max()
        df["dormant_frac"] = np.where(last, width / 1000, 0.0)
        df.loc[last & (df.site == "pre"), "dormant_frac"] = 0.0  # none before the nonlinearity
        df.to_parquet(run / "spectra.parquet", index=False)
    d = report_data(analyze(root, n_resamples=100, last_k=1))
    q = d["dormant"]
    assert q["shown"] and q["threshold"] == 1e-3
    post = {r["width"]: r for r in q["rows"] if r["site"] == "post"}
    assert set(post) == set(WIDTHS)
    for w, r in post.items():
        assert r["median"] == pytest.approx(w / 1000) and r["low"] == r["high"] == pytest.approx(w / 1000)
        assert r["total_d_dormant"] == pytest.approx(w / 1000)
    assert all(r["median"] == 0 for r in q["rows"] if r["site"] == "pre")
    sec = dormant_section.section(d)
    assert len(sec.tables[0].rows) == len(WIDTHS) and all(sec.tables[0].flagged)
