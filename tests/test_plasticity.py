"""capscale plasticity: a 2-optimizer × 3-width toy sweep continued on a second domain."""

import json

import numpy as np
import pandas as pd
import pytest

from capscale.train.config import resolve
from capscale.train.corpus import is_installed
from capscale.train.loop import train
from capscale.train.plasticity import CAPACITY_FILE, PlasticityConfig, continue_run

pytestmark = pytest.mark.skipif(
    not is_installed(), reason="default corpus not fetched: python -m capscale.train.corpus fetch"
)

TINY = ["train.steps=6", "train.eval_every=6", "train.checkpoint_every=6", "train.eval_batches=1", "telemetry.every=3"]


def arithmetic_text(n=6000, seed=0) -> str:
    """A second domain unlike Shakespeare, written here (no third-party text): sums and products."""
    rng = np.random.default_rng(seed)
    return "\n".join(f"{a} plus {b} is {a + b}. {a} times {b} is {a * b}." for a, b in rng.integers(0, 200, (n, 2)))


@pytest.fixture(scope="module")
def toy(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("plasticity")
    corpus = root / "arith.txt"
    corpus.write_text(arithmetic_text())
    for opt in ("adamw", "muon"):
        for mult in (1, 2, 4):
            cfg = resolve("smoke", None, [*TINY, f"optimizer={opt}", f"model.ffn_mult={mult}", f"name={opt}_x{mult}"])
            assert train(cfg, root / "sweep" / "runs" / f"{opt}_x{mult}", log=lambda _m: None)["status"] == "done"
    return root, corpus


def test_plasticity_command_on_a_toy_sweep(toy, capsys):
    from capscale.cli import main

    root, corpus = toy
    out = root / "sweep" / "plasticity"  # inside the sweep: the report shows its section
    assert main([*_args(toy), "--eval-every", "2", "--max-tokens", "60000"]) == 0
    printed = capsys.readouterr().out
    assert "within" in printed and "across" in printed and "muon_x4" in printed
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["adamw_x1", "adamw_x2", "adamw_x4", "muon_x1", "muon_x2", "muon_x4"]
    for name in runs:
        run = out / "runs" / name
        s = json.loads((run / "plasticity.json").read_text())
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == [0, 2, 4]
        # the summary is the curve's: adaptation, area (trapezoid over [0, K], per step), forgetting
        new = [m["val_loss"] for m in metrics]
        assert s["val_loss_new_0"] == new[0] and s["adaptation"] == pytest.approx(new[0] - new[-1])
        assert s["auc_new"] == pytest.approx((new[0] / 2 + new[1] + new[2] / 2) / 2)
        assert s["forgetting"] == pytest.approx(metrics[-1]["val_loss_orig"] - metrics[0]["val_loss_orig"])
        assert s["adaptation"] > 0  # four steps on a new, regular domain lower its loss
        # capacity before/after on the same batches: ranks, dormant fraction, their change
        cap = pd.read_parquet(run / CAPACITY_FILE)
        assert set(cap.step) == {0, 4} and cap.dormant_frac.notna().all()
        post0 = cap[(cap.step == 0) & (cap.site == "post") & (cap.bucket == "all")].hard_rank.median()
        assert s["post_hard_rank_0"] == pytest.approx(post0)
        assert s["d_post_hard_rank"] == pytest.approx(s["post_hard_rank_k"] - s["post_hard_rank_0"])
        # telemetry on during the continuation: windows in the run directory's spectra
        windows = pd.read_parquet(run / "spectra.parquet")
        assert windows.step.nunique() == 2 and windows.step.max() < 4 and windows.dormant_frac.notna().all()
        cfg = json.loads((run / "config.json").read_text())
        assert cfg["plasticity"]["from_step"] == 6 and cfg["train"]["steps"] == 4
    # re-running keeps what is done (resumable), and the relation is printed again
    mtime = (out / "runs" / "adamw_x1" / "plasticity.json").stat().st_mtime
    assert main([*_args(toy), "--max-tokens", "60000"]) == 0
    assert (out / "runs" / "adamw_x1" / "plasticity.json").stat().st_mtime == mtime


def _args(toy) -> list[str]:
    root, corpus = toy
    out = root / "sweep" / "plasticity"
    return ["plasticity", str(root / "sweep"), "--data", f"text:{corpus}", "--steps", "4", "--out", str(out)]


def test_report_section_relates_capacity_to_adaptation(toy):
    """The report of the toy sweep shows the plasticity section: each continued run joined to its
    pretraining run's aggregate, the relation for each measure, the figures of plasticity.json."""
    from capscale.analysis import analyze
    from capscale.cli import main
    from capscale.report.data import report_data
    from capscale.report.sections import plasticity

    root, _ = toy
    out = root / "sweep" / "plasticity"
    if not (out / "runs").is_dir():  # run alone: continue the sweep here (resumes what is done)
        assert main([*_args(toy), "--eval-every", "2", "--max-tokens", "60000"]) == 0
    a = analyze(root / "sweep", n_resamples=100)
    q = report_data(a)["plasticity"]
    assert q["shown"] and q["n_results"] == q["n_matched"] == 6 and q["steps"] == [4]
    assert "text" in q["data"][0]  # the corpus, from the continued runs' config.json
    assert [(r["y"], r["kind"]) for r in q["relation"]] == [
        (y, k) for y in ("auc_new", "adaptation", "forgetting") for k in ("within", "across")
    ]
    within = q["relation"][0]
    assert within["n"] == 6 and within["n_seeds"] == 1 and within["slope"] is not None  # 6 runs, 4 coefficients
    post = a.points[(a.points.site == "post") & (a.points.bucket == "all")].set_index("run_id")
    for r in q["runs"]:
        s = json.loads((out / "runs" / r["pre_run_id"] / "plasticity.json").read_text())
        assert r["auc_new"] == s["auc_new"] and r["forgetting"] == s["forgetting"]
        assert r["pre_hard_rank"] == pytest.approx(post.loc[r["pre_run_id"], "hard_rank"])
        assert r["pre_val_loss"] == pytest.approx(
            a.sweep.runs.set_index("run_id").loc[r["pre_run_id"], "final_val_loss"]
        )
    means = {r["label"]: r["auc_new"] for r in q["by_label"]}
    for label in ("adamw", "muon"):
        assert means[label] == pytest.approx(np.mean([r["auc_new"] for r in q["runs"] if r["label"] == label]))
    sec = plasticity.section({"plasticity": q})
    assert sec.anchor == "plasticity" and len(sec.tables[0].rows) == 6 and len(sec.tables[2].rows) == 6
    assert "one seed: plain OLS" in sec.tables[0].caption


def test_same_corpus_and_unfinished_runs_are_refused(toy, tmp_path):
    root, _ = toy
    with pytest.raises(ValueError, match="training corpus"):
        continue_run(root / "sweep" / "runs" / "adamw_x1", "shakespeare", tmp_path / "c", PlasticityConfig(steps=2))
    with pytest.raises(ValueError, match="not a finished run"):
        continue_run(tmp_path, "shakespeare", tmp_path / "d", PlasticityConfig(steps=2))
    with pytest.raises(ValueError, match="steps"):
        PlasticityConfig(steps=0)


def test_relation_recovers_a_planted_slope():
    """The relation's regression, on a planted table: auc = 3 − 0.2·log R2 + 0.5·loss + noise."""
    from capscale.analysis.plasticity import plasticity_relation

    rng = np.random.default_rng(0)
    n = 60
    t = pd.DataFrame(
        {
            "label": np.repeat(["adamw", "muon"], n // 2),
            "seed": np.tile(np.arange(5), n // 5),
            "pre_hard_rank": np.exp(rng.uniform(1, 4, n)),
            "pre_val_loss": rng.uniform(4, 5, n),
        }
    )
    t["auc_new"] = 3 - 0.2 * np.log(t.pre_hard_rank) + 0.5 * t.pre_val_loss + rng.normal(0, 0.02, n)
    rel = plasticity_relation(t).set_index("kind")
    for kind in ("within", "across"):
        assert rel.loc[kind, "ci_low"] <= -0.2 <= rel.loc[kind, "ci_high"]
        assert rel.loc[kind, "ci_high"] < 0  # the interval excludes no relation
    assert rel.loc["within", "n_seeds"] == 5
    few = plasticity_relation(t.iloc[:2])
    assert few.note.str.len().gt(0).all() and few.slope.isna().all()
