"""The ``cpu-long`` sweep preset: the grid it promises and the token budget it claims."""

from collections import Counter

import pytest

from capscale.sweep.spec import load_spec

torch = pytest.importorskip("torch")


def _runs():
    return load_spec("cpu-long").runs()


def test_cpu_long_expands_to_the_intended_grid():
    runs = _runs()
    cells = Counter(
        (c.model_config().d_model, c.model_config().ffn_dim // c.model_config().d_model, c.label, c.train.steps)
        for c in runs.values()
    )
    seeds = {d: {c.train.seed for c in runs.values() if c.model_config().d_model == d} for d in (32, 64, 96)}
    assert seeds == {32: {0, 1, 2}, 64: {0, 1, 2}, 96: {0, 1, 2}}
    assert {d for d, *_ in cells} == {32, 64, 96}
    for d in (32, 64, 96):
        budgets = sorted({t for dd, _, _, t in cells if dd == d})
        assert len(budgets) == 2 and budgets[1] == 4 * budgets[0]
        for mult in (1, 2, 4):
            for opt in ("adamw", "muon"):
                for steps in budgets:
                    assert cells[(d, mult, opt, steps)] == len(seeds[d])
    assert len(runs) == sum(cells.values()) == 2 * 3 * 2 * 3 * 3
    # head size is the same at every d_model, and every run has the same shape otherwise
    assert {c.model_config().head_dim for c in runs.values()} == {32}
    assert {(c.model_config().n_layer, c.model_config().seq_len, c.train.batch_size) for c in runs.values()} == {
        (2, 128, 16)
    }


def test_cpu_long_budget_reaches_20_tokens_per_parameter_at_the_widest_width():
    from capscale.train.model import GPT

    runs = _runs()
    vocab = int(next(iter(runs.values())).data.tokenizer.split(":")[1])
    for d in (32, 64, 96):
        arm = [c for c in runs.values() if c.model_config().d_model == d]
        widest = max(arm, key=lambda c: c.model_config().ffn_dim)
        model = GPT(widest.with_vocab(vocab).model)
        params = model.num_params(non_embedding=True)
        longest = max(c.train.steps for c in arm)
        tokens = longest * widest.train.batch_size * widest.model_config().seq_len
        assert tokens / params >= 20, (d, tokens / params)
        assert tokens / params < 21  # and not far more: the budget is what the study says it is


def test_cpu_long_measurements_are_shared_and_well_sampled():
    runs = _runs().values()
    for d in (32, 64, 96):
        arm = [c for c in runs if c.model_config().d_model == d]
        longest = max(c.train.steps for c in arm)
        # the long runs end on a measurement step, so every full window is shared by all widths
        assert all(longest % c.telemetry.every == 0 for c in arm)
    for c in runs:
        tel, t = c.telemetry, c.train
        # a window holds >= 30 x the FFN width in tokens, so each of the three buckets
        # (about a third of the tokens each) has N/D >= 10
        assert tel.window * t.batch_size * c.model_config().seq_len >= 30 * c.model_config().ffn_dim
