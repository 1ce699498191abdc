"""attach(out=, run_config=): a run directory from any loop; probe.log; a probe that captured nothing warns."""

import json
import warnings

import pytest
import torch
from test_probe_sites import toy

import capscale
from capscale.probe.probe import NothingCapturedWarning
from capscale.rundir import RunDir
from capscale.runformat import FORMAT_VERSION, RunConfigError, make_config, resolve_config

V = 50


def _train(probe, model, steps, *, log=True):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        ids = torch.randint(0, V, (2, 10), generator=g)
        loss = model(ids, ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        probe.step()
        if log:
            probe.log(step + 1, loss=loss.detach())


def test_attach_out_writes_the_run_format(tmp_path, one_thread):
    model = toy(vocab=V, h=12).train()
    out = tmp_path / "w12"
    probe = capscale.attach(model, every=2, out=out, run_config={"optimizer": "sgd", "seed": 3, "lr": 0.05})
    run = RunDir(out)
    assert run.read_status()["status"] == "running"  # written at attach: a kill leaves an unfinished run
    cfg = run.read_config()
    assert cfg["format_version"] == FORMAT_VERSION
    assert cfg["optimizer"] == {"name": "sgd", "label": "sgd"} and cfg["train"] == {"seed": 3}
    assert cfg["lr"] == 0.05 and cfg["name"] == "w12"
    _train(probe, model, 5)
    assert sorted(run.read_spectra().step.unique()) == [0, 2, 4]  # spectra land as each window closes
    probe.log(5, val_loss=3.5)  # merges with the step-5 loss
    probe.close()
    st = run.read_status()
    assert (st["status"], st["step"]) == ("done", 5)
    assert sorted(run.read_spectra().step.unique()) == [0, 2, 4]
    metrics = run.read_metrics()
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
    assert metrics[-1]["val_loss"] == 3.5 and isinstance(metrics[-1]["loss"], float)
    # the DataFrame stays readable after close
    df = probe.compute()
    assert sorted(df.step.unique()) == [0, 2, 4]
    assert probe.compute().empty  # returned rows are dropped, as before close
    probe.log(6, val_loss=3.4)  # a late evaluation still reaches the run
    assert run.read_metrics()[-1] == {"step": 6, "val_loss": 3.4}


def test_an_error_inside_the_probe_marks_the_run_failed(tmp_path, one_thread):
    model = toy(vocab=V).train()
    with pytest.raises(RuntimeError, match="boom"):
        with capscale.attach(model, every=1, out=tmp_path / "r", run_config={"optimizer": "sgd"}) as probe:
            _train(probe, model, 2, log=False)
            raise RuntimeError("boom")
    st = RunDir(tmp_path / "r").read_status()
    assert st["status"] == "failed" and "boom" in st["reason"]


def test_bad_run_config_is_refused_before_anything_is_written(tmp_path):
    model = toy(vocab=V)
    for bad, msg in [
        (None, "run_config"),
        ({"seed": 0}, "optimizer"),
        ({"optimizer": "sgd", "ffn_width": 0}, "ffn_width"),
        ({"optimizer": "sgd", "seed": 1.5}, "seed"),
        ({"optimizer": "sgd", "x": object()}, "JSON"),
    ]:
        with pytest.raises(RunConfigError, match=msg):
            capscale.attach(model, out=tmp_path / "r", run_config=bad)
        assert not (tmp_path / "r").exists()
    with pytest.raises(ValueError, match="out="):
        capscale.attach(model, run_config={"optimizer": "sgd"})
    with pytest.raises(RuntimeError, match="out=RUN_DIR"):
        capscale.attach(model).log(0, loss=1.0)
    pytest.importorskip("transformers")
    with pytest.raises(RunConfigError, match="optimizer"):  # when the callback is made, not at train start
        capscale.HFCallback(out=tmp_path / "r", run_config={"seed": 0})


def test_a_finished_run_is_not_overwritten(tmp_path, one_thread):
    model = toy(vocab=V).train()
    probe = capscale.attach(model, every=1, out=tmp_path / "r", run_config={"optimizer": "sgd"})
    _train(probe, model, 1)
    probe.close()
    before = (tmp_path / "r" / "config.json").read_text()
    with pytest.raises(ValueError, match="already holds a finished run"):
        capscale.attach(model, out=tmp_path / "r", run_config={"optimizer": "adamw"})
    assert (tmp_path / "r" / "config.json").read_text() == before


def test_config_resolution_fills_width_and_steps_from_the_run():
    cfg = make_config({"optimizer": "adamw", "label": "adamw-wd"}, name="a", writer="t")
    assert "ffn_width" not in cfg["model"] and "steps" not in cfg["train"]
    r = resolve_config(json.loads(json.dumps(cfg)), final_step=40, dims=[256])
    assert r["model"]["ffn_width"] == 256 and r["train"]["steps"] == 40 and r["ffn_width_source"] == "measured"
    with pytest.raises(ValueError, match="several dims"):
        resolve_config(cfg, final_step=40, dims=[64, 256])
    with pytest.raises(ValueError, match="format_version"):
        resolve_config({**cfg, "format_version": 99}, final_step=40, dims=[256])
    declared = make_config({"optimizer": {"name": "adamw", "lr": 1e-3}, "ffn_width": 128}, name="a", writer="t")
    assert resolve_config(declared, final_step=40, dims=[256])["model"]["ffn_width"] == 128
    assert declared["optimizer"] == {"name": "adamw", "lr": 1e-3, "label": "adamw"}


# -- never silent ---------------------------------------------------------------


def _one_warning(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    got = [w for w in caught if issubclass(w.category, NothingCapturedWarning)]
    assert len(got) == 1, [str(w.message) for w in caught]
    return str(got[0].message)


def test_eval_mode_model_warns_once_with_the_fix(one_thread):
    model = toy(vocab=V).eval()  # as from_pretrained returns it
    probe = capscale.attach(model, every=1)
    ids = torch.randint(0, V, (2, 6))

    def run():
        for _ in range(3):
            model(ids)
            probe.step()
        assert probe.compute().empty

    msg = _one_warning(run)
    assert "eval mode" in msg and "model.train()" in msg and "mode='any'" in msg


def test_root_never_called_warns_and_names_root(one_thread):
    class Wrapper(torch.nn.Module):  # a LightningModule-like holder whose forward the loop never calls
        def __init__(self):
            super().__init__()
            self.model = toy(vocab=V)

    w = Wrapper().train()
    probe = capscale.attach(w, every=1)
    ids = torch.randint(0, V, (2, 6))

    def run():
        w.model(ids)
        probe.step()

    msg = _one_warning(run)
    assert "root" in msg and "root=" in msg
    probe.close()
    fixed = capscale.attach(w, every=1, root="model")
    w.model(ids)
    fixed.step()
    assert not fixed.compute().empty


def test_no_forward_at_all_warns(one_thread):
    model = toy(vocab=V).train()
    probe = capscale.attach(model, every=1)
    msg = _one_warning(lambda: probe.close())
    assert "no forward" in msg and "probe.step()" in msg


def test_sites_that_never_run_warn(one_thread):
    class Detached(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unused = toy(vocab=V)  # holds the sites, but forward does not use it
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x)

    m = Detached().train()
    probe = capscale.attach(m, every=1)
    msg = _one_warning(lambda: (m(torch.randn(2, 4)), probe.step()))
    assert "none of the FFN sites ran" in msg


def test_a_healthy_run_does_not_warn(one_thread):
    model = toy(vocab=V).train()
    probe = capscale.attach(model, every=2)  # no total_steps: a window opens at step 4, as training ends

    def run():
        _train(probe, model, 4, log=False)
        probe.close()

    with warnings.catch_warnings():
        warnings.simplefilter("error", NothingCapturedWarning)
        run()


def test_callbacks_are_lazy_top_level_exports():
    import subprocess
    import sys

    code = "import sys, capscale; print([m for m in ('torch', 'transformers', 'lightning') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"  # import capscale stays NumPy-only
    pytest.importorskip("transformers")
    from capscale.probe.integrations.hf import HFCallback

    assert capscale.HFCallback is HFCallback and "HFCallback" in capscale.__all__


def test_a_second_writer_of_the_same_run_directory_is_refused_and_the_lock_is_let_go_on_close(tmp_path, one_thread):
    import os
    import signal

    from test_rundir import _holder

    from capscale.rundir import RunLockedError

    out = tmp_path / "w12"
    other = _holder(out)  # another process writing this run (e.g. a second copy of the same script)
    try:
        with pytest.raises(RunLockedError, match=rf"pid {other.pid}"):
            capscale.attach(toy(vocab=V, h=12).train(), every=2, out=out, run_config={"optimizer": "sgd"})
        assert not RunDir(out).config_path.exists()  # refused before writing anything
    finally:
        other.send_signal(signal.SIGKILL)
        other.wait()
    model = toy(vocab=V, h=12).train()
    probe = capscale.attach(model, every=2, out=out, run_config={"optimizer": "sgd"})
    assert RunDir(out).lock_holder()["pid"] == os.getpid()  # held while the loop runs
    _train(probe, model, 2)
    probe.close()
    assert RunDir(out).lock_holder() is None
