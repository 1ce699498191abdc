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
