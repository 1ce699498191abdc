"""The ``cpu-depth`` presets resolve to the design of docs/preregistration/cpu-depth.md."""

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
    (sweep / "sweep.json").write_text(json.dumps({"name": "x"}))
    dest = tmp_path / "dest"
    (dest / "runs" / "stale").mkdir(parents=True)
    (dest / "README.md").write_text("kept")
    n, _ = mod.export_finished(sweep, dest)
    assert n == 1
    assert sorted(p.name for p in (dest / "runs").iterdir()) == ["done_run"]
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
