"""Sweeps at scale: GPUs split among concurrent runs, torchrun, the [slurm] table, progress."""

import io
import itertools
import json
import logging
import os
import sys
from pathlib import Path

import pytest

from capscale.rundir import RunDir
from capscale.sweep import SweepSpec
from capscale.sweep import executors as ex
from capscale.sweep.executors import RunResult, place, run_local, submitit_parameters, visible_gpus
from capscale.sweep.progress import Progress
from capscale.sweep.sweep import plan
from capscale.sweep.worker import BUSY, HELD_ENV, main, torchrun_command
from capscale.train.corpus import is_installed

# Stands in for the worker: records what it was given; the first two runs wait for each
# other, so two runs are certainly running at once.
RECORDER = r"""
import json, os, sys, time
run_dir = sys.argv[1]
started = os.path.join(os.path.dirname(run_dir), "started")
os.makedirs(started, exist_ok=True)
open(os.path.join(started, os.path.basename(run_dir)), "w").close()
t0, deadline = time.time(), time.time() + 30
while len(os.listdir(started)) < 2 and time.time() < deadline:
    time.sleep(0.01)
given = {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "CAPSCALE_THREADS", "OMP_NUM_THREADS")}
json.dump({"argv": sys.argv[1:], "env": given, "t0": t0, "t1": time.time()}, open(os.path.join(run_dir, "given.json"), "w"))
open(os.path.join(run_dir, "status.json"), "w").write(json.dumps({"status": "done", "step": 1, "reason": None}))
"""


def _record(tmp_path: Path, monkeypatch, n: int, placement) -> list[dict]:
    monkeypatch.setattr(ex, "WORKER", [sys.executable, "-c", RECORDER])
    runs = {f"r{i}": tmp_path / "runs" / f"r{i}" for i in range(n)}
    for d in runs.values():
        d.mkdir(parents=True)
    results = run_local(runs, placement=placement)
    assert sorted(r.status for r in results) == ["done"] * n
    return [json.loads((d / "given.json").read_text()) for d in runs.values()]


def test_each_concurrent_run_gets_its_own_gpus_and_torchrun_past_one(tmp_path, monkeypatch):
    placement = place(None, 2, visible_gpus("0,1,2,3"))
    assert (placement.workers, placement.groups) == (2, [["0", "1"], ["2", "3"]])
    given = _record(tmp_path, monkeypatch, 5, placement)
    assert {g["env"]["CUDA_VISIBLE_DEVICES"] for g in given} == {"0,1", "2,3"}
    assert all(g["argv"][1:] == ["--nproc", "2"] for g in given)  # the worker runs torchrun on 2
    threads = str(max(1, (os.cpu_count() or 1) // 2))
    assert all(g["env"]["CAPSCALE_THREADS"] == g["env"]["OMP_NUM_THREADS"] == threads for g in given)
    overlapping = [(a, b) for a, b in itertools.combinations(given, 2) if a["t0"] < b["t1"] and b["t0"] < a["t1"]]
    assert overlapping  # the first two waited for each other
    assert all(a["env"]["CUDA_VISIBLE_DEVICES"] != b["env"]["CUDA_VISIBLE_DEVICES"] for a, b in overlapping)


def test_one_gpu_per_run_and_cpu_runs_that_see_no_gpu(tmp_path, monkeypatch):
    given = _record(tmp_path / "one", monkeypatch, 3, place(None, 1, ["3", "GPU-7f"]))
    assert {g["env"]["CUDA_VISIBLE_DEVICES"] for g in given} == {"3", "GPU-7f"}
    assert all(g["argv"][1:] == [] for g in given)  # one process each: no torchrun
    # --gpus-per-run 0 on a machine with GPUs: the runs are kept off them
    given = _record(tmp_path / "cpu", monkeypatch, 2, place(2, 0, ["0", "1"]))
    assert [g["env"]["CUDA_VISIBLE_DEVICES"] for g in given] == ["", ""]


def test_visible_gpus(monkeypatch):
    import torch

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,GPU-ab12")
    assert visible_gpus() == ["2", "GPU-ab12"]
    assert visible_gpus("4,5") == ["4", "5"]  # --gpus wins
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert visible_gpus() == ["0", "1", "2"]
    assert place().groups == [["0"], ["1"], ["2"]]  # default: one GPU per run, a run per GPU
    for bad in ("0,,1", "1,1", ""):
        with pytest.raises(ValueError, match="distinct device ids"):
            visible_gpus(bad)


@pytest.mark.parametrize(
    "workers,per_run,gpus,match",
    [
        (None, 2, ["0"], "--gpus-per-run 2 needs 2 GPUs; 1 visible"),
        (None, 1, [], "needs 1 GPUs; 0 visible .*--gpus-per-run 0 to train on CPU"),
        (3, 2, ["0", "1", "2", "3"], "--workers 3 with --gpus-per-run 2 needs 6 GPUs; 4 visible"),
        (0, None, [], "--workers must be at least 1"),
        (None, -1, [], "--gpus-per-run must be 0"),
    ],
)
def test_bad_placements_are_refused(workers, per_run, gpus, match):
    with pytest.raises(ValueError, match=match):
        place(workers, per_run, gpus)


def test_cli_refuses_a_bad_gpu_split_before_writing(tmp_path, capsys):
    from capscale.cli import main as cli

    out = tmp_path / "sweep"
    argv = ["sweep", "--preset", "smoke", "--out", str(out), "--gpus", "0", "--gpus-per-run", "2"]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert (
        err
        == "capscale sweep: error: --gpus-per-run 2 needs 2 GPUs; 1 visible (0) (use --gpus-per-run 0 to train on CPU)\n"
    )
    assert not out.exists()


def test_torchrun_ranks_train_only_under_the_launchers_lock(tmp_path, monkeypatch, capsys):
    run_dir = plan(SweepSpec.from_dict({"name": "t", "base": "smoke", "axes": {"ffn_mult": [1]}}), tmp_path)[
        "adamw_w32_s0"
    ]
    assert torchrun_command(run_dir, 4)[1:] == [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=4",
        "-m",
        "capscale.sweep.worker",
        str(run_dir),
    ]
    monkeypatch.setenv(HELD_ENV, str(run_dir.resolve()))
    monkeypatch.setattr("capscale.sweep.worker.die_with_parent", lambda: None)
    assert main([str(run_dir)]) == 2  # nobody holds the lock: a stray rank trains nothing
    assert "is not held by the launching worker" in capsys.readouterr().err
    assert sorted(p.name for p in run_dir.iterdir()) == ["request.json"]  # not even a lock file


# -- the [slurm] table --------------------------------------------------------

BASE = {"name": "s", "base": "smoke", "axes": {"ffn_mult": [1]}}
TABLE = {"partition": "gpu", "gpus_per_node": 4, "nodes": 1, "time": "1-12:00:00", "account": "acc"}


def test_slurm_table_is_how_not_what(tmp_path):
    spec = SweepSpec.from_dict({**BASE, "slurm": {**TABLE, "slurm_qos": "high"}, "gpus_per_run": 4})
    assert spec.slurm["slurm_qos"] == "high" and spec.gpus_per_run == 4
    assert "slurm" not in spec.to_dict() and "gpus_per_run" not in spec.to_dict()
    plan(spec, tmp_path)
    plan(SweepSpec.from_dict(BASE), tmp_path)  # the same sweep, resumed on other hardware


@pytest.mark.parametrize(
    "extra,match",
    [
        ({"slurm": {"partion": "gpu"}}, "has no option 'partion'"),
        ({"slurm": {"time": "soon"}}, "time must be minutes or"),
        ({"slurm": {"nodes": 2}}, "a run spans one node"),
        ({"slurm": {"gpus_per_node": "4"}}, "gpus_per_node must be a whole number"),
        ({"slurm": {"slurm_qoss": "high"}}, "no SLURM option \\['slurm_qoss'\\]"),
        ({"slurm": "gpu"}, "must be a table"),
        ({"slurm": {"gpus_per_node": 4}, "gpus_per_run": 2}, "disagree"),
        ({"gpus_per_run": -1}, "gpus_per_run must be a whole number >= 0"),
    ],
)
def test_bad_slurm_tables(extra, match):
    if "slurm_qoss" in str(extra):
        pytest.importorskip("submitit")
    with pytest.raises(ValueError, match=match):
        SweepSpec.from_dict({**BASE, **extra})


def _fake_srun(tmp_path, monkeypatch):
    """submitit's SLURM executor looks for srun; nothing here is ever submitted."""
    srun = tmp_path / "bin" / "srun"
    srun.parent.mkdir()
    srun.write_text("#!/bin/sh\nexit 1\n")
    srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{srun.parent}{os.pathsep}{os.environ['PATH']}")


def test_slurm_table_reaches_sbatch(tmp_path, monkeypatch):
    submitit = pytest.importorskip("submitit")
    _fake_srun(tmp_path, monkeypatch)
    params = submitit_parameters({**TABLE, "slurm_qos": "high"}, 4)
    executor = submitit.AutoExecutor(folder=tmp_path / "jobs", cluster="slurm")
    executor.update_parameters(**params)
    sbatch = executor._executor._make_submission_file_text("python -m x", "uid")
    for line in ("partition=gpu", "account=acc", "time=1-12:00:00", "gpus-per-node=4", "nodes=1", "qos=high"):
        assert f"#SBATCH --{line}\n" in sbatch
    # gpus_per_run alone sets the node's GPUs
    assert submitit_parameters({"partition": "gpu"}, 2)["gpus_per_node"] == 2


@pytest.mark.skipif(not is_installed(), reason="default corpus not fetched")
def test_slurm_executor_submits_the_table_and_runs_the_job(tmp_path, monkeypatch):
    submitit = pytest.importorskip("submitit")
    seen = {}

    class Recording(submitit.AutoExecutor):  # submitit's in-process debug cluster stands in for SLURM
        def __init__(self, folder, cluster):
            seen["cluster"] = cluster
            super().__init__(folder=folder, cluster="debug")

        def update_parameters(self, **kwargs):
            seen.update(kwargs)
            super().update_parameters(**kwargs)

    monkeypatch.setattr(submitit, "AutoExecutor", Recording)
    _fake_srun(tmp_path, monkeypatch)

    def train(run_dir, threads, log):  # the job runs in this process: the plumbing, not the training
        log("trained")
        RunDir(run_dir).write_status("done", 2)
        return RunDir(run_dir).read_status()

    monkeypatch.setattr("capscale.sweep.worker._train", train)
    spec = SweepSpec.from_dict({**BASE, "slurm": {**TABLE, "gpus_per_node": 1}})
    from capscale.sweep import run_sweep

    results = run_sweep(spec, tmp_path, executor="slurm", log=lambda _m: None)
    assert [(r.status, r.step) for r in results] == [("done", 2)]
    assert seen == {
        "cluster": "slurm",
        "timeout_min": 1440,
        "slurm_partition": "gpu",
        "gpus_per_node": 1,
        "nodes": 1,
        "slurm_time": "1-12:00:00",
        "slurm_account": "acc",
    }
    log = (tmp_path / "runs" / "adamw_w32_s0" / "worker.log").read_text()
    assert log.startswith("=== worker pid") and log.endswith("\ntrained\n=== done at step 2\n")


def test_slurm_executor_without_slurm_is_refused_before_writing(tmp_path, monkeypatch, capsys):
    pytest.importorskip("submitit")
    from capscale.cli import main as cli

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    out = tmp_path / "sweep"
    assert cli(["sweep", "--preset", "smoke", "--out", str(out), "--executor", "slurm"]) == 2
    assert (
        capsys.readouterr().err
        == "capscale sweep: error: --executor slurm: no SLURM on this machine (srun is not on PATH)\n"
    )
    assert not out.exists()


# -- progress -----------------------------------------------------------------


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


class Tty(io.StringIO):
    def isatty(self):
        return True


def _res(name, status, seconds, reason=None):
    return RunResult(name, status, 5, reason, seconds)


def test_progress_line_counts_and_eta(caplog):
    clock, stream = Clock(), io.StringIO()
    p = Progress("t", 6, 2, stream=stream, clock=clock)
    with caplog.at_level(logging.INFO, logger="capscale.sweep"):
        p.start("a")
        p.start("b")
        assert p.line() == "0/6 done, 2 running, 0 failed, 4 queued, 0s elapsed, ETA --"
        clock.t += 100
        p.finish(_res("a", "done", 100.0))
        p.start("c")
        clock.t += 20
        p.finish(_res("c", "failed", 20.0, "boom"))
        p.finish(_res("d", BUSY, 1.0, "held elsewhere"))
    # mean 100 s a run: b has 0 s left, 2 queued runs on 2 slots take 100 s more
    assert p.line() == "1/6 done, 1 running, 1 failed, 1 busy elsewhere, 2 queued, 2m00s elapsed, ETA 1m40s"
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs[:2] == ["  start    a", "  start    b"]
    assert msgs[2].startswith("  done     a in 1m40s  [1/6 done, 1 running, 0 failed, 4 queued")
    assert msgs[4].startswith("  failed   c in 20s (boom)  [")
    assert stream.getvalue() == ""  # not a terminal: log lines only, never a carriage return
    assert not any("\r" in m for m in msgs)


def test_progress_is_a_live_line_in_a_terminal(caplog):
    clock, tty = Clock(), Tty()
    p = Progress("t", 2, 1, stream=tty, clock=clock)
    with caplog.at_level(logging.INFO, logger="capscale.sweep"):
        p.start("a")
        clock.t += 5
        p.tick()
        p.finish(_res("a", "done", 5.0))
        p.close()
    drawn = tty.getvalue()
    assert "\r\x1b[Ksweep t: 0/2 done, 1 running, 0 failed, 1 queued, 5s elapsed, ETA --" in drawn
    assert drawn.endswith("\r\x1b[K")  # closed: the live line is cleared
    assert [r.getMessage()[:14] for r in caplog.records] == ["  start    a", "  done     a i"]
    # a log callable takes the events and the line is never drawn
    tty2 = Tty()
    q = Progress("t", 1, 1, stream=tty2, log=lambda _m: None)
    q.start("a")
    q.tick()
    assert tty2.getvalue() == ""


def test_the_specs_gpus_per_run_is_the_default_and_the_command_line_wins(tmp_path):
    from capscale.sweep import run_sweep

    spec = SweepSpec.from_dict({**BASE, "gpus_per_run": 2})
    with pytest.raises(ValueError, match="--gpus-per-run 2 needs 2 GPUs; 1 visible"):
        run_sweep(spec, tmp_path / "a", gpus="0")
    with pytest.raises(ValueError, match="--gpus-per-run 3 needs 3 GPUs; 2 visible"):
        run_sweep(spec, tmp_path / "b", gpus="0,1", gpus_per_run=3)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_progress_heartbeat_outside_a_terminal(caplog):
    clock = Clock()
    p = Progress("t", 3, 1, stream=io.StringIO(), clock=clock)
    with caplog.at_level(logging.INFO, logger="capscale.sweep"):
        p.start("a")
        clock.t += 299
        p.tick()
        assert len(caplog.records) == 1  # nothing new yet
        clock.t += 2
        p.tick()
        p.finish(_res("a", "diverged", 301.0, "non-finite loss"))
    assert caplog.records[1].getMessage() == "  [0/3 done, 1 running, 0 failed, 2 queued, 5m01s elapsed, ETA --]"
    # only a diverged run so far: its wall time stands in for the mean
    assert p.line().endswith(", 0 running, 0 failed, 2 queued, 5m01s elapsed, ETA 10m02s")
    assert "1 diverged" in p.line()
