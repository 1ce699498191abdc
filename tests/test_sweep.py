"""Sweeps: planning, resumable local execution under SIGKILL, failures recorded, submitit."""

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from capscale.rundir import RunDir
from capscale.sweep import SWEEP_PRESETS, SweepSpec, load_spec, run_sweep
from capscale.sweep.executors import _result
from capscale.sweep.sweep import pending_runs, plan, select_runs, sweep_status
from capscale.sweep.worker import BUSY, LOCK, run_lock
from capscale.train.corpus import is_installed

HAVE_CORPUS = is_installed()
needs_corpus = pytest.mark.skipif(not HAVE_CORPUS, reason="default corpus not fetched")

# 3 widths × 2 optimizers of the smoke preset, 20 steps, plus an arm that diverges.
SPEC = {
    "name": "t",
    "base": "smoke",
    "base_config": {"train.steps": 20, "train.checkpoint_every": 5},
    "axes": {"ffn_mult": [1, 2, 4], "optimizer": ["adamw", "muon"]},
    "extra": [
        {"axes": {"ffn_mult": [1], "optimizer": [{"name": "adamw", "label": "adamw_hot", "params": {"lr": 1e6}}]}}
    ],
}


def _snapshot(sweep: Path) -> dict:
    out = {}
    for run in sorted((sweep / "runs").iterdir()):
        st = json.loads((run / "status.json").read_text())
        metrics = [
            {k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
            for line in (run / "metrics.jsonl").read_text().splitlines()
        ]
        spectra = run / "spectra.parquet"
        ranks = (
            pd.read_parquet(spectra)[["step", "layer", "site", "bucket", "soft_rank", "hard_rank"]]
            if spectra.exists()
            else None
        )
        ckpts = sorted((run / "checkpoints").glob("*.pt"))
        weights = torch.load(ckpts[-1], weights_only=True)["model"] if ckpts else {}
        out[run.name] = (st["status"], st["step"], metrics, ranks, weights)
    return out


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        sa, sb = a[name], b[name]
        assert sa[:3] == sb[:3], name
        if sa[3] is not None:
            pd.testing.assert_frame_equal(sa[3], sb[3])
        assert sa[4].keys() == sb[4].keys()
        for k in sa[4]:  # bit-identical; the diverging arm's weights may hold NaN
            torch.testing.assert_close(sa[4][k], sb[4][k], rtol=0, atol=0, equal_nan=True, msg=f"{name} {k}")


def test_spec_names_and_presets():
    runs = SweepSpec.from_dict(SPEC).runs()
    assert sorted(runs) == sorted(
        [f"{o}_w{w}_s0" for o in ("adamw", "muon") for w in (32, 64, 128)] + ["adamw_hot_w32_s0"]
    )
    assert runs["muon_w128_s0"].optimizer.name == "muon"
    assert runs["muon_w128_s0"].model_config().ffn_dim == 128
    for preset in SWEEP_PRESETS:
        spec = load_spec(preset)
        widths = {c.model_config().ffn_dim for c in spec.runs().values()}
        labels = {c.label for c in spec.runs().values()}
        # a β fit needs 3 widths; cpu-depth-lr is a learning-rate search at x1 and x8, not a β sweep
        assert len(widths) >= (2 if preset == "cpu-depth-lr" else 3) and len(labels) >= 2, preset
    cpu = load_spec("cpu").runs()
    assert {c.label for c in cpu.values()} >= {"adamw", "muon", "normuon", "dion_r1_2", "dion_r1_16", "shampoo"}
    assert any(c.train.steps == 2 * load_spec("cpu").runs()["adamw_w128_s0"].train.steps for c in cpu.values())
    assert any(c.model_config().pos == "none" for c in cpu.values())


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"axes": {"width": [1]}}, "unknown sweep axis"),
        ({"axes": {"ffn_mult": [1], "ffn_width": [64]}}, "not both"),
        ({"axes": {"ffn_mult": []}}, "non-empty list"),
        ({"axes": {"optimizer": ["sgd"]}}, "unknown optimizer 'sgd'"),
        ({"axes": {"ffn_mult": [0]}}, "FFN width must be"),
        ({"colour": "red"}, "unknown sweep key"),
    ],
)
def test_bad_specs(bad, match):
    with pytest.raises(ValueError, match=match):
        SweepSpec.from_dict({"name": "x", "base": "smoke", **bad})


def test_a_directory_holds_one_sweep(tmp_path):
    plan(SweepSpec.from_dict(SPEC), tmp_path)
    other = SweepSpec.from_dict({**SPEC, "axes": {"ffn_mult": [1, 2, 8], "optimizer": ["adamw"]}})
    with pytest.raises(ValueError, match="different sweep"):
        plan(other, tmp_path)


def test_a_request_from_an_older_capscale_is_the_same_run_but_a_changed_one_is_not(tmp_path):
    runs = plan(SweepSpec.from_dict(SPEC), tmp_path)
    request = runs["adamw_w32_s0"] / "request.json"
    old = json.loads(request.read_text())
    # written before telemetry.background existed (defaults fill it), and with it toggled
    del old["telemetry"]["background"]
    request.write_text(json.dumps(old))
    plan(SweepSpec.from_dict(SPEC), tmp_path)
    request.write_text(json.dumps({**old, "telemetry": {**old["telemetry"], "background": "host"}}))
    plan(SweepSpec.from_dict(SPEC), tmp_path)
    request.write_text(json.dumps({**old, "telemetry": {**old["telemetry"], "every": 3}}))
    with pytest.raises(ValueError, match="planned with a different config"):
        plan(SweepSpec.from_dict(SPEC), tmp_path)


def test_pending_runs_order_and_skip_finished(tmp_path):
    spec = SweepSpec.from_dict({**SPEC, "axes": {**SPEC["axes"], "seed": [1, 0]}})
    runs = plan(spec, tmp_path)
    RunDir(runs["adamw_w32_s0"]).write_status("done", 20)
    RunDir(runs["muon_w32_s1"]).write_status("failed", 3, "boom")  # failed runs are retried
    order = list(pending_runs(spec, runs))
    assert "adamw_w32_s0" not in order and "muon_w32_s1" in order and len(order) == len(runs) - 1
    # seed-major; within a seed the grid before the extra arm, optimizer by optimizer, widths ascending
    grid = [f"{o}_w{w}_s{{}}" for o in ("adamw", "muon") for w in (32, 64, 128)]
    assert order == [g.format(0) for g in grid[1:]] + ["adamw_hot_w32_s0"] + [g.format(1) for g in grid]


def test_status_reads_states_and_the_lock(tmp_path):
    spec = SweepSpec.from_dict(SPEC)
    with pytest.raises(FileNotFoundError, match="no sweep"):
        sweep_status(spec, tmp_path)
    runs = plan(spec, tmp_path)
    RunDir(runs["adamw_w32_s0"]).write_status("done", 20)
    RunDir(runs["muon_w32_s0"]).write_status("failed", 3, "boom")
    RunDir(runs["muon_w64_s0"]).write_status("running", 5)
    RunDir(runs["muon_w128_s0"]).write_status("running", 10)
    # 5 steps left at 1,000 tokens/s (the mean of the recent records) with 8 x 64 tokens a step
    cfg = spec.runs()["muon_w128_s0"]
    tps = cfg.train.batch_size * cfg.model_config().seq_len
    RunDir(runs["muon_w128_s0"]).append_metrics(
        [{"step": 5, "loss": 4.0, "tokens_per_s": 900.0}, {"step": 15, "loss": 3.5, "tokens_per_s": 1100.0}]
    )
    RunDir(runs["muon_w64_s0"]).append_metrics([{"step": 5, "loss": 4.25, "tokens_per_s": 1000.0}])
    with open(runs["muon_w128_s0"] / LOCK, "w") as lock:  # a live worker holds its run's lock
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = {r["name"]: r for r in sweep_status(spec, tmp_path)}
    assert list(rows)[0] == "adamw_w32_s0"  # finished first, then the resume order
    # a running run: the latest logged step (metrics run ahead of the status), its loss and ETA
    running = rows["muon_w128_s0"]
    assert (running["status"], running["step"], running["total"], running["loss"]) == ("running", 15, 20, 3.5)
    assert running["eta_s"] == pytest.approx(5 * tps / 1000.0)
    assert rows["muon_w64_s0"]["status"] == "interrupted" and rows["muon_w64_s0"]["step"] == 5
    assert rows["muon_w64_s0"]["loss"] == 4.25 and "eta_s" not in rows["muon_w64_s0"]  # nobody trains it
    assert rows["muon_w32_s0"] == {"name": "muon_w32_s0", "status": "failed", "step": 3, "total": 20, "reason": "boom"}
    assert rows["adamw_w64_s0"]["status"] == "not started"
    # lock released: nobody trains muon_w128_s0 now, so it too reads as interrupted
    assert {r["status"] for r in sweep_status(spec, tmp_path)} == {"done", "failed", "interrupted", "not started"}


def test_only_selects_by_pattern_and_rejects_a_typo(tmp_path):
    runs = plan(SweepSpec.from_dict(SPEC), tmp_path)
    assert list(select_runs(runs, ["*_w32_s0"])) == ["adamw_w32_s0", "muon_w32_s0", "adamw_hot_w32_s0"]
    assert list(select_runs(runs, ["muon_w128_s0", "adamw_w6?_s0"])) == ["adamw_w64_s0", "muon_w128_s0"]
    assert select_runs(runs, None) == runs
    with pytest.raises(ValueError, match="'adam_w32_s0' matches none of the sweep's 7 runs"):
        select_runs(runs, ["adam_w32_s0"])


@needs_corpus
def test_cli_only_runs_the_chosen_runs(tmp_path, capsys):
    from capscale.cli import main

    cfg = tmp_path / "spec.toml"
    cfg.write_text(
        'name = "o"\nbase = "smoke"\n[base_config]\n"train.steps" = 5\n"telemetry.every" = 5\n'
        '[axes]\nffn_mult = [1, 2]\noptimizer = ["adamw", "muon"]\n'
    )
    out = tmp_path / "sweep"
    assert main(["sweep", "--config", str(cfg), "--out", str(out), "--only", "muon_*", "--workers", "1"]) == 0
    capsys.readouterr()
    assert main(["sweep", "--config", str(cfg), "--out", str(out), "--status"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "sweep o: 4 runs: 2 done, 2 not started"
    assert [(ln[:15].strip(), ln.split()[-3]) for ln in lines[1:]] == [
        ("done", "muon_w32_s0"),
        ("done", "muon_w64_s0"),
        ("not started", "adamw_w32_s0"),
        ("not started", "adamw_w64_s0"),
    ]


@needs_corpus
def test_sigkill_resume_equals_uninterrupted_and_divergence_is_recorded(tmp_path):
    spec = SweepSpec.from_dict(SPEC)
    ref = tmp_path / "ref"
    results = run_sweep(spec, ref, workers=2, log=lambda _m: None)
    status = {r.name: r.status for r in results}
    assert status.pop("adamw_hot_w32_s0") == "diverged"
    assert set(status.values()) == {"done"}
    # the worker module runs once per process: no runpy double-import warning in its log
    assert not [p for p in ref.glob("runs/*/worker.log") if "found in sys.modules" in p.read_text()]

    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(SPEC))
    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-c",
        "import json,sys; from capscale.sweep import SweepSpec, run_sweep;"
        f"run_sweep(SweepSpec.from_dict(json.load(open({str(spec_file)!r}))), {str(out)!r}, workers=2)",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 200
    # kill once some run has a checkpoint but the sweep is not over
    while time.time() < deadline and proc.poll() is None:
        if list(out.glob("runs/*/checkpoints/*.pt")):
            break
        time.sleep(0.05)
    assert proc.poll() is None
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)  # workers die with their parent (PDEATHSIG)
    unfinished = [
        p
        for p in out.glob("runs/*")
        if not (p / "status.json").exists() or json.loads((p / "status.json").read_text())["status"] == "running"
    ]
    assert unfinished, "the kill came too late to test anything"
    states = {r["name"]: r["status"] for r in sweep_status(spec, out)}
    assert {states[p.name] for p in unfinished} <= {"interrupted", "not started"}
    assert "running" not in states.values()  # no worker survived its parent
    resumed = [p for p in unfinished if (p / "status.json").exists()]
    run_sweep(spec, out, workers=2, log=lambda _m: None)
    _same(_snapshot(ref), _snapshot(out))
    for p in resumed:  # the resumed worker appended to the killed one's log
        assert (p / "worker.log").read_text().count("=== worker pid") == 2, p.name


@needs_corpus
def test_submitit_local_executor(tmp_path):
    pytest.importorskip("submitit")
    spec = SweepSpec.from_dict(
        {
            "name": "s",
            "base": "smoke",
            "base_config": {"train.steps": 5, "telemetry.every": 5},
            "axes": {"ffn_mult": [1, 2, 4], "optimizer": ["adamw"]},
        }
    )
    results = run_sweep(spec, tmp_path, executor="submitit-local", log=lambda _m: None)
    assert sorted(r.status for r in results) == ["done"] * 3


def test_worker_refuses_a_run_another_worker_holds_but_waits_out_a_status_read(tmp_path, monkeypatch):
    import threading

    import capscale.train.loop
    from capscale.sweep.worker import run_one

    runs = plan(SweepSpec.from_dict(SPEC), tmp_path)
    run_dir = runs["adamw_w32_s0"]
    trained = []
    monkeypatch.setattr(capscale.train.loop, "train", lambda cfg, d, log: trained.append(d) or {"status": "done"})
    with open(run_dir / LOCK, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a live worker
        with pytest.raises(RuntimeError, match="being trained by another process"):
            run_one(run_dir)
    assert trained == []

    reader = open(run_dir / LOCK)
    fcntl.flock(reader, fcntl.LOCK_SH)  # what `sweep --status` holds for a moment
    threading.Timer(0.2, reader.close).start()
    assert run_one(run_dir) == {"status": "done"} and trained == [run_dir]


def test_worker_command_line_and_a_directory_without_request(tmp_path):
    from capscale.sweep.worker import run_one

    proc = subprocess.run([sys.executable, "-m", "capscale.sweep.worker"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("usage: python -m capscale.sweep.worker RUN_DIR")
    with pytest.raises(FileNotFoundError, match="has no request.json: not a run directory planned by a sweep"):
        run_one(tmp_path)
    assert not (tmp_path / LOCK).exists()  # failed before touching the directory


def test_status_into_a_closed_pipe_exits_quietly(tmp_path):
    """`capscale sweep --status | head` must not end in a BrokenPipeError traceback."""
    out = tmp_path / "sweep"
    cfg = tmp_path / "spec.toml"
    cfg.write_text(
        'name = "p"\nbase = "smoke"\n[axes]\nffn_mult = [1, 2, 4, 8]\noptimizer = ["adamw", "muon"]\nseed = [0, 1, 2]\n'
    )
    plan(load_spec(config_file=cfg), out)
    proc = subprocess.Popen(
        [sys.executable, "-m", "capscale.cli", "sweep", "--config", str(cfg), "--out", str(out), "--status"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # the reader is gone before the command writes anything
    err = proc.stderr.read().decode()
    assert proc.wait() == 1
    assert err == ""


def _files(run_dir: Path) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _hold(run_dir: Path):
    """Another sweep's worker: it holds the run's lock and has named itself in the lock file."""
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, json.dumps({"pid": 4242, "host": "elsewhere", "started": "2026-11-29T12:00:00+00:00"}).encode())
    return fd


@needs_corpus
def test_a_losing_sweep_leaves_the_run_it_lost_untouched(tmp_path):
    """Issue 15.4: the refusal writes no status, no worker.log, no lock content of its own."""
    spec = SweepSpec.from_dict({**SPEC, "axes": {"ffn_mult": [1], "optimizer": ["adamw"]}, "extra": []})
    run_dir = plan(spec, tmp_path)["adamw_w32_s0"]
    RunDir(run_dir).write_status("running", 5)
    (run_dir / "worker.log").write_text("the other sweep's worker output\n")
    fd = _hold(run_dir)
    try:
        before = _files(run_dir)
        lines = []
        results = run_sweep(spec, tmp_path, workers=1, gpus_per_run=0, log=lines.append)
        assert _files(run_dir) == before
    finally:
        os.close(fd)
    assert [(r.name, r.status, r.step) for r in results] == [("adamw_w32_s0", BUSY, None)]
    assert "being trained by another process (pid 4242 on elsewhere, since 2026-11-29T12:00:00+00:00)" in (
        results[0].reason
    )
    assert "1 left to the process that holds them" in lines[-1]


def test_a_dead_worker_is_marked_failed_only_under_the_lock(tmp_path):
    """The executor's after-the-fact `failed` (a worker killed without a word) needs the run's
    lock: a run that another process has taken since is reported busy and left as it is."""
    run_dir = plan(SweepSpec.from_dict(SPEC), tmp_path)["adamw_w32_s0"]
    RunDir(run_dir).write_status("running", 5)
    (run_dir / "worker.log").write_text("step 5\nout of memory\n")
    fd = _hold(run_dir)
    try:
        before = _files(run_dir)
        res = _result("adamw_w32_s0", run_dir, 1.0, "", -9)
        assert (res.status, _files(run_dir)) == (BUSY, before)
    finally:
        os.close(fd)
    res = _result("adamw_w32_s0", run_dir, 1.0, "", -9)
    assert (res.status, res.step) == ("failed", 5)
    assert res.reason == "worker exited with code -9 before the run finished; its last words: out of memory"
    assert RunDir(run_dir).read_status()["status"] == "failed"
    assert (run_dir / LOCK).read_text() == ""  # the holder's name is cleared when it lets go
    with run_lock(run_dir):
        assert json.loads((run_dir / LOCK).read_text())["pid"] == os.getpid()


FAKE_TRAIN = """
import sys
import capscale.train.loop as loop
from capscale.rundir import RunDir
def train(cfg, out, log):
    run = RunDir(out)
    first = run.read_status() is None
    run.write_status("running", 0)
    log("log line from train")
    print("to stdout", flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    if first:
        raise RuntimeError("boom on the first try")
    run.write_status("done", 20)
    return run.read_status()
loop.train = train
from capscale.sweep.worker import main
raise SystemExit(main(sys.argv[1:]))
"""


def test_worker_output_is_appended_to_worker_log(tmp_path):
    run_dir = plan(SweepSpec.from_dict(SPEC), tmp_path)["adamw_w32_s0"]
    cmd = [sys.executable, "-c", FAKE_TRAIN, str(run_dir)]
    first = subprocess.run(cmd, capture_output=True, text=True)
    assert first.returncode == 1 and first.stdout == first.stderr == ""  # all of it went to the log
    st = RunDir(run_dir).read_status()
    assert (st["status"], st["reason"]) == ("failed", "RuntimeError: boom on the first try")
    assert subprocess.run(cmd, capture_output=True, text=True).returncode == 0
    log = (run_dir / "worker.log").read_text()
    assert log.count("=== worker pid") == 2  # the resume appended; nothing was clobbered
    assert log.count("log line from train\nto stdout\nto stderr\n") == 2
    assert "Traceback" in log and "RuntimeError: boom on the first try" in log
    assert "=== failed at step 0 (RuntimeError: boom on the first try)\n=== worker pid" in log
    assert log.endswith("=== done at step 20\n")
    assert RunDir(run_dir).read_status()["status"] == "done"


# The real worker (lock, log, exit codes) around a stand-in for training that takes a while
# and, like ``train``, returns a finished run's status without training it again.
SLOW_TRAIN = """
import sys, time
import capscale.sweep.worker as w
from capscale.rundir import RunDir
def train(run_dir, threads, log):
    run = RunDir(run_dir)
    if (run.read_status() or {}).get("status") == "done":
        return run.read_status()
    run.write_status("running", 0)
    with open(run_dir / "trained", "a") as f:
        f.write("once\\n")
    log("training")
    time.sleep(2)
    run.write_status("done", 20)
    return run.read_status()
w._train = train
raise SystemExit(w.main(sys.argv[1:]))
"""


def test_two_concurrent_sweeps_train_each_run_once(tmp_path, monkeypatch):
    import threading

    from capscale.sweep import executors

    monkeypatch.setattr(executors, "WORKER", [sys.executable, "-c", SLOW_TRAIN])
    runs = {n: d for n, d in plan(SweepSpec.from_dict(SPEC), tmp_path).items() if n in ("adamw_w32_s0", "muon_w32_s0")}
    results: list = []
    start = threading.Barrier(2)

    def sweep():
        start.wait()
        results.extend(executors.run_local(runs, placement=executors.place(len(runs), 0, [])))

    threads = [threading.Thread(target=sweep) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.name for r in results) == sorted(list(runs) * 2)
    assert {r.status for r in results} <= {"done", BUSY} and BUSY in {r.status for r in results}
    for name, run_dir in runs.items():
        assert (run_dir / "trained").read_text() == "once\n", name
        assert RunDir(run_dir).read_status()["status"] == "done"
        log = (run_dir / "worker.log").read_text()
        # one banner per worker that held the run; the refused ones wrote nothing
        held = sum(r.status == "done" for r in results if r.name == name)
        assert log.count("=== worker pid") == held and log.count("training") == 1
