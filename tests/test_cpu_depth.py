"""The ``cpu-depth`` presets resolve to the design of docs/preregistration/cpu-depth.md."""

import math
from collections import Counter

import pytest

from capscale.sweep.spec import CPU_DEPTH_LR, CPU_DEPTH_LR_CANDIDATES, load_spec
from capscale.sweep.sweep import run_order

torch = pytest.importorskip("torch")

WIDTHS = {64, 128, 256, 512}
DEFAULT_LR = {"adamw": 3e-3, "muon": 0.02}
# the default corpus with bytebpe:1024: its token count, and the smallest token bucket's share
# of the training split (HEAD, 32.8%; the pre-registration rounds down to 30% for the window)
CORPUS_TOKENS = 2_150_223
MIN_BUCKET_SHARE = 0.30


def _params(cfg):
    from capscale.train.model import GPT

    vocab = int(cfg.data.tokenizer.split(":")[1])
    return GPT(cfg.with_vocab(vocab).model).num_params(non_embedding=True)


def _cells(runs):
    return Counter(
        (c.model_config().n_layer, c.model_config().ffn_dim, c.label, c.optimizer.params["lr"], c.train.steps)
        for c in runs.values()
    )


def test_cpu_depth_grid_is_the_preregistered_design():
    runs = load_spec("cpu-depth").runs()
    assert len(runs) == 2 * 4 * 2 * 5
    cells = _cells(runs)
    assert {(depth, w, lab) for depth, w, lab, _, _ in cells} == {
        (d, w, o) for d in (2, 6) for w in WIDTHS for o in ("adamw", "muon")
    }
    assert set(cells.values()) == {5}  # 5 seeds per cell
    assert {c.train.seed for c in runs.values()} == {0, 1, 2, 3, 4}
    shapes = {(c.model_config().d_model, c.model_config().head_dim, c.model_config().seq_len) for c in runs.values()}
    assert shapes == {(64, 32, 128)}
    # each optimizer at its one chosen rate, a candidate of the learning-rate runs
    for opt, lr in CPU_DEPTH_LR.items():
        assert {c.optimizer.params["lr"] for c in runs.values() if c.label == opt} == {lr}
        assert lr in CPU_DEPTH_LR_CANDIDATES[opt]


@pytest.mark.parametrize("depth", [2, 6])
def test_cpu_depth_budget_is_20_tokens_per_parameter_of_the_x4_model(depth):
    arm = [c for c in load_spec("cpu-depth").runs().values() if c.model_config().n_layer == depth]
    steps = {c.train.steps for c in arm}
    assert len(steps) == 1  # the same tokens for every width of a depth
    x4 = next(c for c in arm if c.model_config().ffn_dim == 256)
    tokens = steps.pop() * x4.train.batch_size * x4.model_config().seq_len
    assert 20 <= tokens / _params(x4) < 20.01


def test_cpu_depth_windows_are_well_sampled_and_shared():
    specs = [load_spec(p) for p in ("cpu-depth", "cpu-depth-rep", "cpu-depth-lr")]
    for c in (c for s in specs for c in s.runs().values()):
        tel, t = c.telemetry, c.train
        # the last window closes on the last step, so every width of a series shares it
        assert t.steps % tel.every == 0
        # N/D >= 10 in the smallest token bucket at the widest FFN
        assert tel.window * t.batch_size * c.model_config().seq_len * MIN_BUCKET_SHARE >= 10 * c.model_config().ffn_dim
        assert tel.buckets and set(tel.sites) == {"pre", "post"}


def test_cpu_depth_runs_seed_0_of_every_cell_first():
    spec = load_spec("cpu-depth")
    order = run_order(spec, spec.runs())
    runs = spec.runs()
    first = [runs[n] for n in order[:16]]
    assert {c.train.seed for c in first} == {0}
    assert len(_cells({n: runs[n] for n in order[:16]})) == 16
    assert [c.model_config().n_layer for c in first] == [6] * 8 + [2] * 8  # depth 6 first


def test_cpu_depth_learning_rate_runs():
    runs = load_spec("cpu-depth-lr").runs().values()
    grid = load_spec("cpu-depth").runs().values()
    depth6 = next(c for c in grid if c.model_config().n_layer == 6)
    got = {(c.optimizer.name, c.optimizer.params["lr"], c.model_config().ffn_dim) for c in runs}
    want = {(o, lr, w) for o, rates in CPU_DEPTH_LR_CANDIDATES.items() for lr in rates for w in (64, 512)}
    assert got == want and len(runs) == 12
    for opt, lr in DEFAULT_LR.items():  # the existing defaults are among the candidates
        assert lr in CPU_DEPTH_LR_CANDIDATES[opt]
    assert len({c.label for c in runs}) == 6  # one label per (optimizer, rate): series stay apart
    for c in runs:
        assert (c.model_config().n_layer, c.train.seed) == (6, 0)
        assert c.train.steps * 4 == depth6.train.steps  # 5 tokens per parameter of the x4 model
        assert c.train.eval_batches == 32


def test_cpu_depth_repetition_arm_halves_the_corpus_and_keeps_the_rest():
    rep = load_spec("cpu-depth-rep").runs()
    grid = load_spec("cpu-depth").runs()
    assert len(rep) == 4 * 2 * 3
    for name, c in rep.items():
        main = grid[name]  # the same run name: the same cell and seed in the main grid
        assert c.data.max_tokens * 2 in (CORPUS_TOKENS, CORPUS_TOKENS + 1)
        assert main.data.max_tokens is None
        a, b = c.to_dict(), main.to_dict()
        a["data"].pop("max_tokens"), b["data"].pop("max_tokens")
        assert a == b
    assert {c.train.seed for c in rep.values()} == {0, 1, 2}


def _script(name):
    import importlib.util
    from pathlib import Path

    scripts = Path(__file__).resolve().parents[1] / "scripts"
    spec = importlib.util.spec_from_file_location(name, scripts / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_learning_rate_rule_lowest_mean_loss_with_ties_to_the_default():
    choose = _script("cpu_depth_lr").choose
    inf = float("inf")
    assert choose({1e-3: 4.10, 3e-3: 4.05, 1e-2: 4.00}, 3e-3) == 1e-2  # lowest, no tie
    assert choose({1e-3: 4.10, 3e-3: 4.008, 1e-2: 4.00}, 3e-3) == 3e-3  # tied with the default: the default
    assert choose({0.01: 4.00, 0.02: 4.05, 0.04: 4.005}, 0.02) == 0.01  # tied, equally near: the smaller
    assert choose({0.01: 4.30, 0.02: inf, 0.04: 4.20}, 0.02) == 0.04  # a diverged default is out
    with pytest.raises(ValueError):
        choose({0.01: inf, 0.02: inf}, 0.02)


def _fake_run(root, name, lr, width, val, status="done", opt="adamw", steps=880):
    import json

    run = root / "runs" / name
    run.mkdir(parents=True)
    cfg = {"optimizer": {"name": opt, "params": {"lr": lr}}, "model": {"ffn_width": width}, "train": {"steps": steps}}
    (run / "config.json").write_text(json.dumps(cfg))
    (run / "status.json").write_text(json.dumps({"status": status, "step": steps}))
    rows = [{"step": steps // 2, "val_loss": val - 1.0}, {"step": steps, "loss": val, "val_loss": val}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_learning_rate_table_reads_final_validation_loss_and_averages_x1_and_x8(tmp_path):
    mod = _script("cpu_depth_lr")
    _fake_run(tmp_path, "a", 1e-3, 64, 4.2)
    _fake_run(tmp_path, "b", 1e-3, 512, 4.0)
    _fake_run(tmp_path, "c", 3e-3, 64, 3.0)
    _fake_run(tmp_path, "d", 3e-3, 512, 3.0, status="diverged")
    _fake_run(tmp_path, "e", 1e-2, 64, 2.0)
    _fake_run(tmp_path, "f", 1e-2, 512, 2.0)
    (tmp_path / "runs" / "f" / "config.json").rename(tmp_path / "runs" / "f" / "request.json")  # not started
    (tmp_path / "runs" / "f" / "status.json").unlink()
    rows = mod.table(tmp_path)["adamw"]
    assert rows[1e-2]["L"] == float("inf")  # an unfinished run rules its rate out
    assert rows[1e-3]["L"] == pytest.approx(4.1)  # the last step's val_loss, not an earlier one
    assert rows[3e-3]["L"] == float("inf")  # a diverged run rules its rate out
    assert mod.choose({lr: r["L"] for lr, r in rows.items()}, 3e-3) == 1e-3


def test_export_keeps_finished_runs_only_and_other_files(tmp_path):
    import json

    mod = _script("cpu_depth_export")
    sweep = tmp_path / "sweep"
    _fake_run(sweep, "done_run", 1e-3, 64, 4.0)
    _fake_run(sweep, "running_run", 1e-3, 128, 4.0, status="running")
    _fake_run(sweep, "diverged_run", 1e-3, 256, 4.0, status="diverged")  # ended: exported, to be listed
    (sweep / "sweep.json").write_text(json.dumps({"name": "x"}))
    dest = tmp_path / "dest"
    (dest / "runs" / "stale").mkdir(parents=True)
    (dest / "README.md").write_text("kept")
    n, _ = mod.export_finished(sweep, dest)
    assert n == 2
    assert sorted(p.name for p in (dest / "runs").iterdir()) == ["diverged_run", "done_run"]
    assert (dest / "README.md").read_text() == "kept"
    assert json.loads((dest / "sweep.json").read_text()) == {"name": "x"}
    assert (dest / "runs" / "done_run" / "metrics.jsonl").is_file()


def test_runner_takes_every_run_once_seed_by_seed_grid_before_repetition_arm():
    stages = _script("cpu_depth_run").STAGES
    assert stages["lr"] == [("cpu-depth-lr", None)]
    grid = stages["grid"]
    for preset in ("cpu-depth", "cpu-depth-rep"):
        seeds = [s for p, s in grid if p == preset]
        assert seeds == sorted({c.train.seed for c in load_spec(preset).runs().values()})
    # seed s of the grid comes before seed s of the repetition arm, which comes before seed s + 1
    assert grid[:3] == [("cpu-depth", 0), ("cpu-depth-rep", 0), ("cpu-depth", 1)]


def _planted_runs(root, preset, betas, rng, noise=0.02, status=None):
    """Every run of ``preset`` with rank = 2·w^β (β per optimizer and depth) times log-normal noise."""
    import json

    import pandas as pd

    status = status or {}
    for name, c in load_spec(preset).runs().items():
        m = c.model_config()
        run = root / "runs" / name
        run.mkdir(parents=True)
        cfg = {
            "optimizer": {"name": c.optimizer.name},
            "model": {"n_layer": m.n_layer, "ffn_width": m.ffn_dim},
            "train": {"steps": c.train.steps, "seed": c.train.seed},
            "telemetry": {"window": c.telemetry.window},
        }
        (run / "config.json").write_text(json.dumps(cfg))
        (run / "status.json").write_text(json.dumps({"status": status.get(name, "done")}))
        beta = betas[(c.optimizer.name, m.n_layer)]
        last = c.train.steps - c.telemetry.window
        rows = []
        for step in (0, last):  # an early window the verdict must not read
            for layer in range(m.n_layer):
                rank = 2.0 * m.ffn_dim ** (beta if step == last else 0.0) * math.exp(rng.normal(0, noise))
                for site, bucket in (("post", "all"), ("pre", "all"), ("post", "tail")):
                    # other rows are flat in width: read, they would pull every slope towards 0
                    value = rank if (site, bucket) == ("post", "all") else 5.0
                    rows.append({"step": step, "layer": layer, "site": site, "bucket": bucket, "hard_rank": value})
        pd.DataFrame(rows).to_parquet(run / "spectra.parquet")


def test_depth_verdict_recovers_planted_gap_and_interaction(tmp_path):
    import numpy as np

    mod = _script("cpu_depth_verdict")
    rng = np.random.default_rng(0)
    betas = {("adamw", 6): 0.3, ("muon", 6): 0.9, ("adamw", 2): 0.4, ("muon", 2): 0.5}
    _planted_runs(tmp_path / "grid", "cpu-depth", betas, rng)
    _planted_runs(tmp_path / "rep", "cpu-depth-rep", {("adamw", 6): 0.3, ("muon", 6): 0.9}, rng)
    out = mod.analyse(tmp_path / "grid", tmp_path / "rep")
    d, i, r = out["primary"], out["interaction"], out["repetition"]
    assert d["n"] == 40 and i["dof"] == 80 - 8
    assert d["low"] < 0.6 < d["high"] and d["high"] - d["low"] < 0.05
    assert i["low"] < 0.5 < i["high"]
    assert r["low"] < 0 < r["high"] and not r["moves"]
    assert out["verdict"] == "confirms the paper at this scale"

    # independently: the point estimates are differences of per-cell slopes, and I's variance is
    # the pooled residual variance times the sum of 1 / Sxx over the four cells
    points, _ = mod.run_points(tmp_path / "grid", "cpu-depth")
    slopes, sse, sxx = {}, 0.0, 0.0
    for (o, depth), g in points.groupby(["optimizer", "depth"]):
        x, y = np.log(g["width"].to_numpy(float)), np.log(g["rank"].to_numpy(float))
        b, a = np.polyfit(x, y, 1)
        slopes[(o, depth)] = b
        sse += float(((y - a - b * x) ** 2).sum())
        sxx += 1.0 / float(((x - x.mean()) ** 2).sum())
    assert d["D"] == pytest.approx(slopes[("muon", 6)] - slopes[("adamw", 6)], abs=1e-10)
    inter = slopes[("muon", 6)] - slopes[("adamw", 6)] - slopes[("muon", 2)] + slopes[("adamw", 2)]
    assert i["I"] == pytest.approx(inter, abs=1e-10)
    from scipy import stats

    half = stats.t.ppf(0.975, 72) * math.sqrt(sse / 72 * sxx)
    assert i["high"] - i["I"] == pytest.approx(half, rel=1e-9)


def test_depth_verdict_refutes_when_the_gap_is_excluded_and_lists_diverged_runs(tmp_path):
    import numpy as np

    mod = _script("cpu_depth_verdict")
    betas = {("adamw", 6): 0.5, ("muon", 6): 0.5, ("adamw", 2): 0.5, ("muon", 2): 0.5}
    _planted_runs(tmp_path, "cpu-depth", betas, np.random.default_rng(1), status={"muon_w512_L6_t3520_s3": "diverged"})
    out = mod.analyse(tmp_path)
    assert out["left_out"] == ["muon_w512_L6_t3520_s3 (diverged)"]
    assert out["primary"]["n"] == 39  # left out, never replaced
    assert out["primary"]["high"] < 0.3 and out["verdict"] == "refutes the paper at this scale"


def test_depth_verdict_refuses_until_every_run_has_ended(tmp_path, capsys):
    import json

    import numpy as np

    mod = _script("cpu_depth_verdict")
    betas = {k: 0.5 for k in (("adamw", 6), ("muon", 6), ("adamw", 2), ("muon", 2))}
    _planted_runs(tmp_path, "cpu-depth", betas, np.random.default_rng(2))
    (tmp_path / "runs" / "adamw_w64_L2_t1600_s4" / "status.json").write_text(json.dumps({"status": "running"}))
    import shutil

    shutil.rmtree(tmp_path / "runs" / "muon_w64_L6_t3520_s0")
    assert mod.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "2 of 80 runs have not ended" in err and "muon_w64_L6_t3520_s0" in err and "adamw_w64_L2_t1600_s4" in err


def test_depth_verdict_rule():
    verdict = _script("cpu_depth_verdict").verdict
    i_pos, i_zero = {"low": 0.01}, {"low": -0.2}
    assert verdict({"D": 0.5, "low": 0.1, "high": 0.9}, i_pos) == "confirms the paper at this scale"
    assert verdict({"D": 0.5, "low": 0.1, "high": 0.9}, i_zero) == "inconclusive"  # no interaction
    assert verdict({"D": 0.29, "low": 0.1, "high": 0.5}, i_pos) == "inconclusive"  # D below the gap
    assert verdict({"D": 0.1, "low": -0.1, "high": 0.29}, i_pos) == "refutes the paper at this scale"


def test_runner_queue_is_the_preregistered_order_and_parallel_slots_take_it_in_order(tmp_path):
    import threading
    import time

    mod = _script("cpu_depth_run")
    mod._prepare_data = lambda spec, say: None  # no corpus needed to plan
    items = mod.queue("grid", tmp_path)
    assert len(items) == 80 + 24
    assert [p for p, _, _ in items[:24]] == ["cpu-depth"] * 16 + ["cpu-depth-rep"] * 8
    assert all(name.endswith("_s0") for _, name, _ in items[:24]) and items[24][1].endswith("_s1")
    assert items[0][1] == "adamw_w64_L6_t3520_s0" and items[0][2] == tmp_path / "cpu-depth" / "runs" / items[0][1]

    started, running, most, lock = [], [0], [0], threading.Lock()

    def fake(preset, name, run_dir):
        with lock:
            started.append(name)
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= 1
        return 1 if name == items[3][1] else 0

    assert mod.run_queue(items[:8], 2, fake) == 1  # the one failure counted
    assert most[0] == 2
    # slots take the queue in its order: a run starts no later than two places after its turn
    assert all(abs(started.index(name) - i) <= 1 for i, (_, name, _) in enumerate(items[:8]))


def test_committed_learning_rate_runs_give_the_rates_in_the_preset():
    """The export in docs/results/cpu-depth/lr (committed: nested results are not git-ignored)
    reproduces, by the pre-registered rule, the rates the cpu-depth preset uses."""
    from pathlib import Path

    mod = _script("cpu_depth_lr")
    lr = Path(__file__).resolve().parents[1] / "docs" / "results" / "cpu-depth" / "lr"
    assert len(list((lr / "runs").glob("*/metrics.jsonl"))) == 12
    table = mod.table(lr)
    chosen = {opt: mod.choose({r: row["L"] for r, row in rows.items()}, DEFAULT_LR[opt]) for opt, rows in table.items()}
    used = {c.optimizer.name: c.optimizer.params["lr"] for c in load_spec("cpu-depth").runs().values()}
    assert chosen == used == {"adamw": 3e-3, "muon": 0.01}


def test_depth_tables_give_the_planted_per_layer_gaps_and_matched_layer_interactions(tmp_path, capsys):
    """The secondary measures' tables, from the report of a planted sweep shaped like the study:
    Muon's β_hard grows 0.1 per layer faster at depth 6 than AdamW's, 0.05 at depth 2; the
    tables show each layer's Δβ and the first- and last-layer interactions (0.05 and 0.30)."""
    import json
    import re

    from synthetic_runs import depth_sweep

    from capscale.analysis import analyze
    from capscale.report.data import report_data

    betas = {
        ("adamw", 6): [0.5, 0.55, 0.6, 0.65, 0.7, 0.75],
        ("muon", 6): [0.6, 0.7, 0.8, 0.9, 1.0, 1.1],
        ("adamw", 2): [0.5, 0.6],
        ("muon", 2): [0.55, 0.65],
    }
    root = depth_sweep(tmp_path / "sweep", betas)
    (root / "report").mkdir()
    (root / "report" / "report.json").write_text(json.dumps(report_data(analyze(root, n_resamples=100))))
    _script("cpu_depth_tables").main([str(root)])
    out = capsys.readouterr().out
    num = r"(-?\d+\.\d+)"
    per_layer = {
        (int(d), int(layer)): tuple(map(float, (dh, lo, hi)))
        for d, layer, dh, lo, hi in re.findall(rf"\| (\d) \| (\d) \| [^|]+ \| [^|]+ \| {num} \[{num}, {num}\] \|", out)
    }
    assert set(per_layer) == {(2, 0), (2, 1)} | {(6, k) for k in range(6)}
    for (d, layer), (dh, lo, hi) in per_layer.items():
        want = betas["muon", d][layer] - betas["adamw", d][layer]
        assert lo - 0.005 <= want <= hi + 0.005 and abs(dh - want) < 0.03, (d, layer, dh, lo, hi)  # 2 decimals
    inter = dict(
        (which, tuple(map(float, rest)))
        for which, *rest in re.findall(
            rf"\| (first|last) layer \| β_hard \| [^|]+ \| [^|]+ \| {num} \[{num}, {num}\] \|", out
        )
    )
    for which, want in (("first", 0.05), ("last", 0.30)):
        v, lo, hi = inter[which]
        assert lo - 0.005 <= want <= hi + 0.005 and abs(v - want) < 0.03, (which, inter[which])
    assert "median over layers (the product's)" in out and "### Lack of fit" in out
