"""When the probe looks: steps, windows, micro-batches, modes, compute/flush/close, monitoring,
and that unmeasured steps cost nothing."""

import math

import numpy as np
import pytest
import torch
from test_probe_sites import toy
from torch.utils._python_dispatch import TorchDispatchMode

import capscale
from capscale.probe import Schedule
from capscale.spectrum import hard_rank_from_covariance

V = 50


def ids(seed, b=2, s=6):
    return torch.randint(0, V, (b, s), generator=torch.Generator().manual_seed(seed))


def test_schedule_rule():
    s = Schedule(every=5, window=2, total_steps=12)
    assert [t for t in range(14) if s.starts_at(t)] == [0, 5, 10]  # 10..11 is already the final window
    assert s.end(10) == 12 and s.end(0) == 2
    # the final window is a full one, ending training (not a one-step window at the last step)
    s = Schedule(every=25, window=8, total_steps=300)
    starts = [t for t in range(300) if s.starts_at(t)]
    assert starts[-2:] == [275, 292] and s.end(292) == 300
    # ... unless the last regular window ends later: then it starts there, and no window overlaps
    s = Schedule(every=10, window=8, total_steps=25)
    starts = [t for t in range(25) if s.starts_at(t)]
    assert starts == [0, 10, 18] and s.end(18) == 25
    assert all(s.end(a) <= b for a, b in zip(starts, starts[1:]))
    assert [t for t in range(30) if Schedule(every=5, window=5, total_steps=20).starts_at(t)] == [0, 5, 10, 15]
    with pytest.raises(ValueError, match="overlap"):
        Schedule(every=2, window=3)
    with pytest.raises(ValueError, match="every"):
        Schedule(every=0)
    with pytest.raises(ValueError, match="total_steps"):
        Schedule(total_steps=0)


def test_measured_steps_windows_and_micro_batches():
    model = toy()
    probe = capscale.attach(model, every=4, window=2, total_steps=11)
    seen = {}
    for step in range(11):
        for micro in range(3):  # micro-batches of one step: one step
            model(ids(100 * step + micro))
        seen[step] = probe.active
        probe.step()
    probe.close()
    assert [s for s, a in seen.items() if a] == [0, 1, 4, 5, 8, 9, 10]
    with pytest.raises(RuntimeError, match="closed"):
        probe.step()  # compute() still returns the kept rows after close


def test_records_step_labels_and_sample_counts():
    model = toy()
    probe = capscale.attach(model, every=4, window=2, total_steps=11)
    for step in range(11):
        for micro in range(3):
            model(ids(100 * step + micro))
        probe.step()
    df = probe.compute()
    probe.close()
    assert sorted(df.step.unique()) == [0, 4, 8, 10]
    per = df[(df.layer == 0) & (df.site == "pre") & (df.bucket == "all")].set_index("step").n_samples
    # windows of 2 steps x 3 micro-batches x 12 rows; the last step alone
    assert per.to_dict() == {0: 72, 4: 72, 8: 72, 10: 36}
    assert set(df.bucket) == {"all"} and set(df.site) == {"pre", "post"} and set(df.layer) == {0, 1}


def test_window_rows_match_reference_and_reset_semantics():
    model = toy()
    probe = capscale.attach(model, every=1, window=1, dtype=torch.float64)
    xs = []
    h = model.blocks[1].mlp.c_fc.register_forward_hook(
        lambda m, a, o: xs.append(o.detach().double().reshape(-1, o.shape[-1]))
    )
    for k in range(3):
        model(ids(k))
    snap = probe.compute(reset=False)
    model(ids(3))
    full = probe.compute(reset=True)
    after = probe.compute()
    h.remove()
    probe.close()

    def hard(x):
        return hard_rank_from_covariance(np.cov(x.numpy(), rowvar=False))

    pick = lambda d: d[(d.layer == 1) & (d.site == "pre")].iloc[0]
    assert pick(snap).n_samples == 36 and pick(snap).hard_rank == pytest.approx(hard(torch.cat(xs[:3])), rel=1e-9)
    assert pick(full).n_samples == 48 and pick(full).hard_rank == pytest.approx(hard(torch.cat(xs)), rel=1e-9)
    assert after.empty  # reset restarted the open window and drained the rows


def test_steps_only_move_forward_and_can_jump():
    model = toy()
    probe = capscale.attach(model, every=10, window=2)
    model(ids(0))
    probe.step(5)  # jump: closes the window started at 0
    assert not probe.active and len(probe.compute()) == 2 * 2
    probe.step(5)  # no-op
    with pytest.raises(ValueError, match="forward"):
        probe.step(4)
    probe.step(20)
    assert probe.active
    probe.close()


def test_train_eval_and_any_modes():
    model = toy()
    counts = {}
    for mode in ("train", "eval", "any"):
        probe = capscale.attach(model, every=1, mode=mode)
        model.train()
        model(ids(0))
        model.eval()
        with torch.no_grad():
            model(ids(1, b=1))
        df = probe.compute()
        probe.close()
        counts[mode] = int(df.n_samples.iloc[0])
    assert counts == {"train": 12, "eval": 6, "any": 18}


def test_context_manager_flushes_to_sinks_and_removes_hooks():
    model = toy()
    got = []

    class Collect(capscale.probe.Sink):
        def write_spectra(self, frame):
            got.append(frame)

    with capscale.attach(model, every=100, sinks=[Collect()]) as probe:
        model(ids(0))
        assert model.blocks[0].mlp.c_fc._forward_hooks
    assert len(got) == 1 and len(got[0]) == 4
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    probe.close()  # idempotent


def test_monitor_level_hard_rank_without_eigendecomposition():
    model = toy()
    scal = []

    class Collect(capscale.probe.Sink):
        def write_scalars(self, step, scalars):
            scal.append((step, scalars))

    xs = []
    h = model.blocks[0].mlp.c_fc.register_forward_hook(
        lambda m, a, o: xs.append(o.detach().double().reshape(-1, o.shape[-1]))
    )
    probe = capscale.attach(
        model, every=4, monitor_every=2, monitor_sites="pre", sinks=[Collect()], dtype=torch.float64
    )
    per_step = {}
    for step in range(5):
        model(ids(step))
        per_step[step] = xs[-1]
        probe.step()
    probe.close()
    h.remove()
    mon = probe.monitor_frame()
    assert sorted(mon.step.unique()) == [0, 2, 4] and set(mon.site) == {"pre"}
    r = mon[(mon.step == 2) & (mon.layer == 0)].iloc[0]
    assert r.hard_rank == pytest.approx(hard_rank_from_covariance(np.cov(per_step[2].numpy(), rowvar=False)), rel=1e-9)
    assert r.n_samples == 12
    assert [s for s, sc in scal if "capscale/monitor/pre/hard_rank" in sc] == [0, 2, 4]
    assert [s for s, sc in scal if "capscale/pre/all/soft_rank" in sc] == [0, 4]


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("persistent", [False, True])
def test_unmeasured_forward_does_no_extra_work(persistent):
    model = toy()
    x = ids(0)

    def oplog():
        model.zero_grad(set_to_none=True)
        with OpLog() as log:
            model(x).sum().backward()
        return log.ops

    baseline = oplog()
    probe = capscale.attach(model, every=1000, persistent_hooks=persistent)
    model(x)  # step 0 is measured
    probe.step()
    assert not probe.active
    before = {k: [a.count for a in accs] for k, accs in probe._pool.items()}
    assert before and all(c == [0] for c in before.values())  # released after the window
    measured_ops = oplog()
    # Not one extra tensor op: no accumulator update, no copy, no device->host read.
    assert measured_ops == baseline
    assert all(a.count == 0 for accs in probe._pool.values() for a in accs)
    if not persistent:
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    # On the meta device any device->host read (.item(), .cpu()) would raise.
    meta = toy().to("meta")
    p2 = capscale.attach(meta, every=1000, start_step=1, persistent_hooks=persistent)
    meta(torch.zeros(2, 6, dtype=torch.long, device="meta"))
    p2.close()
    probe.close()


def test_meta_device_catches_host_reads_when_measuring():
    meta = toy().to("meta")
    probe = capscale.attach(meta, every=1)
    with pytest.raises(RuntimeError, match="meta"):  # the measured path reads a scalar (NaN check)
        meta(torch.zeros(2, 6, dtype=torch.long, device="meta"))
    probe.close(flush=False)


def test_no_grad_and_bf16_autocast_accumulate_in_float32():
    model = toy()
    got = []
    h = model.blocks[0].mlp.c_proj.register_forward_pre_hook(lambda m, a: got.append(a[0].detach()))
    probe = capscale.attach(model, every=1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids(0, b=8, s=16))
    df = probe.compute()
    probe.close()
    h.remove()
    assert got[0].dtype == torch.bfloat16
    x = got[0].double().reshape(-1, got[0].shape[-1]).numpy()
    lam = np.clip(np.linalg.eigvalsh(np.cov(x, rowvar=False)), 1e-12, None)
    p = lam / lam.sum()
    row = df[(df.layer == 0) & (df.site == "post")].iloc[0]
    assert row.soft_rank == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-5)


def test_activation_checkpoint_recompute_is_not_counted_twice():
    from torch.utils.checkpoint import checkpoint

    model = toy()

    class Ckpt(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            h = self.inner.emb(x)
            for b in self.inner.blocks:
                h = checkpoint(b, h, use_reentrant=False)
            return self.inner.head(h)

    wrapped = Ckpt(model)
    probe = capscale.attach(wrapped, every=1)
    wrapped(ids(0)).sum().backward()  # backward re-runs every block's forward
    df = probe.compute()
    probe.close()
    assert set(df.n_samples) == {12}


def test_torch_compile_with_persistent_hooks():
    model = toy()
    compiled = torch.compile(model, backend="eager")
    probe = capscale.attach(compiled, every=2, dtype=torch.float64)
    assert probe.persistent_hooks
    xs = []
    for step in range(3):
        x = ids(step)
        compiled(x)
        if step % 2 == 0:
            xs.append(model.blocks[0].mlp.c_fc(model.blocks[0].norm(model.emb(x))).detach().double().reshape(-1, 12))
        probe.step()
    df = probe.compute()
    probe.close()
    assert sorted(df.step.unique()) == [0, 2]
    row = df[(df.step == 2) & (df.layer == 0) & (df.site == "pre")].iloc[0]
    assert row.n_samples == 12
    assert row.hard_rank == pytest.approx(hard_rank_from_covariance(np.cov(xs[1].numpy(), rowvar=False)), rel=1e-9)


def test_attach_validates_arguments():
    model = toy()
    with pytest.raises(ValueError, match="mode"):
        capscale.attach(model, mode="training")
    with pytest.raises(ValueError, match="overlap"):
        capscale.attach(model, every=2, window=3)
    with pytest.raises(ValueError, match="dtype"):
        capscale.attach(model, dtype=torch.float16)
    with pytest.raises(TypeError, match="not a sink"):
        capscale.attach(model, sinks=[object()])
    with pytest.raises(ValueError, match="monitor_sites"):
        capscale.attach(model, sites={"post": "blocks.{layer}.mlp.c_proj"}, monitor_every=2, monitor_sites=("pre",))
    assert all(not m._forward_hooks for m in model.modules())


def test_explicit_batch_context_and_frequency_table_file(tmp_path):
    from capscale.spectrum import FrequencyTable

    path = FrequencyTable(np.arange(V, 0, -1)).save(tmp_path / "freq.json")
    model = toy()
    xs = []
    h = model.blocks[0].mlp.c_fc.register_forward_hook(lambda m, a, o: xs.append(o.detach().double().reshape(-1, 12)))
    probe = capscale.attach(model, every=1, freq_table=path, dtype=torch.float64)
    x = ids(0, b=2, s=8)
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[1, 4:] = False
    with probe.batch(mask=keep) as p:  # ids still come from the forward's first argument
        assert p is probe
        model(x)
    model(ids(1, b=1, s=8))  # outside the block: no mask
    df = probe.compute()
    probe.close()
    h.remove()
    rows = torch.cat([xs[0][keep.reshape(-1)], xs[1]]).numpy()
    row = df[(df.layer == 0) & (df.site == "pre") & (df.bucket == "all")].iloc[0]
    assert row.n_samples == 12 + 8
    assert row.hard_rank == pytest.approx(hard_rank_from_covariance(np.cov(rows, rowvar=False)), rel=1e-9)


@pytest.mark.parametrize(
    "every,window,total", [(e, w, t) for e in (1, 3, 7, 25) for w in (1, 2, 3, 7) for t in (1, 5, 26, 300) if w <= e]
)
def test_schedule_windows_tile_without_overlap_and_the_last_ends_training(every, window, total):
    s = Schedule(every=every, window=window, total_steps=total)
    starts = [t for t in range(total + every) if s.starts_at(t)]
    assert starts[0] == 0 and all(t % every == 0 for t in starts[:-1])
    assert all(s.end(a) <= b for a, b in zip(starts, starts[1:]))  # no overlap
    assert s.end(starts[-1]) == total  # the last measurement ends training
    # it is a full window whenever the run is long enough and the regular windows leave room
    full = max(total - window, 0)
    if full % every == 0 or full - full % every + window <= full:
        assert s.end(starts[-1]) - starts[-1] == min(window, total)
