"""The training loop end to end on the smoke preset (real default corpus)."""

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

from capscale.train.config import resolve
from capscale.train.corpus import is_installed
from capscale.train.loop import train

HAVE_CORPUS = is_installed()

pytestmark = pytest.mark.skipif(
    not HAVE_CORPUS, reason="default corpus not fetched: python -m capscale.train.corpus fetch"
)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _no_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


def _cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "capscale", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw
    )


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "smoke"
    status = train(resolve("smoke"), out, log=lambda _m: None)
    return out, status


def test_smoke_run_writes_the_run_directory_contract(smoke_run):
    out, status = smoke_run
    assert status["status"] == "done" and status["step"] == 30
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["ffn_width"] == 4 * cfg["model"]["d_model"]
    assert cfg["model"]["vocab_size"] % 64 == 0 and "torch" in cfg["versions"]
    m = _metrics(out)
    assert [r["step"] for r in m] == [5, 10, 15, 20, 25, 30]
    assert all({"step", "loss", "lr", "tokens_per_s"} <= set(r) for r in m)
    evals = [r for r in m if "val_loss" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert all({"val_loss_head", "val_loss_mid", "val_loss_tail"} <= set(r) for r in evals)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]  # it learns
    # rare tokens are harder to predict than frequent ones
    assert evals[-1]["val_loss_tail"] > evals[-1]["val_loss_head"]
    assert m[-1]["lr"] < m[0]["lr"]  # linear warmdown over the last 20%
    spectra = pd.read_parquet(out / "spectra.parquet")
    assert set(spectra["site"]) == {"pre", "post"}
    assert set(spectra["bucket"]) == {"all", "head", "mid", "tail"}
    assert set(spectra["layer"]) == {0, 1}
    assert {"soft_rank", "hard_rank", "eigenvalues", "sampling_status"} <= set(spectra.columns)
    assert json.loads((out / "status.json").read_text())["status"] == "done"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000030.pt"]


def test_rerun_of_a_finished_run_is_a_no_op(smoke_run):
    out, _ = smoke_run
    before = (out / "metrics.jsonl").read_text()
    status = train(resolve("smoke"), out, log=lambda _m: None)
    assert status["status"] == "done"
    assert (out / "metrics.jsonl").read_text() == before


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    over = ["train.steps=80", "train.checkpoint_every=10"]
    ref = tmp_path / "ref"
    train(resolve("smoke", overrides=over), ref, log=lambda _m: None)
    out = tmp_path / "killed"
    args = ["train", "--preset", "smoke", *(a for o in over for a in ("--set", o)), "--out", str(out)]
    proc = _cli(*args)
    ckpt_dir = out / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if ckpt_dir.is_dir() and any(p.name.endswith(".pt") for p in ckpt_dir.iterdir()):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # at once: mid-run, after at least one checkpoint
    proc.wait()
    assert json.loads((out / "status.json").read_text())["status"] == "running", "finished before the kill"
    resumed = _cli(*args)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert _no_timing(_metrics(out)) == _no_timing(_metrics(ref))
    a = torch.load(ref / "checkpoints" / "step_00000080.pt", weights_only=True)
    b = torch.load(out / "checkpoints" / "step_00000080.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["optimizer"]["state"]:
        for name, v in a["optimizer"]["state"][k].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["optimizer"]["state"][k][name])), (k, name)
    sa, sb = pd.read_parquet(ref / "spectra.parquet"), pd.read_parquet(out / "spectra.parquet")
    pd.testing.assert_frame_equal(sa, sb)


def test_diverged_run_stops_cleanly(tmp_path):
    out = tmp_path / "div"
    status = train(resolve("smoke", overrides=["lr=1e6", "train.steps=20"]), out, log=lambda _m: None)
    assert status["status"] == "diverged"
    st = json.loads((out / "status.json").read_text())
    assert st["status"] == "diverged" and "non-finite" in st["reason"]
    m = _metrics(out)
    assert m and m[-1]["loss"] is None  # NaN written as null, everything before kept
    assert (out / "config.json").exists()


def test_corrupt_checkpoint_is_a_clear_error_and_nothing_is_overwritten(smoke_run, tmp_path):
    ref, _ = smoke_run
    out = tmp_path / "corrupt"
    train(resolve("smoke", overrides=["train.steps=10"]), out, log=lambda _m: None)
    ckpt = out / "checkpoints" / "step_00000010.pt"
    ckpt.write_bytes(b"not a checkpoint")
    (out / "status.json").write_text(json.dumps({"status": "running", "step": 10, "reason": None}))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match="corrupt or unreadable"):
        train(resolve("smoke", overrides=["train.steps=10"]), out, log=lambda _m: None)
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != "status.json"}
    assert all(after[k] == before[k] for k in after)


def test_different_config_on_existing_run_dir_is_refused(smoke_run):
    out, _ = smoke_run
    before = (out / "config.json").read_text()
    with pytest.raises(ValueError, match=r"different config \(differs in \['optimizer.label', 'optimizer.name'\]"):
        train(resolve("smoke", overrides=["optimizer=muon"]), out, log=lambda _m: None)
    assert (out / "config.json").read_text() == before


def test_missing_corpus_says_how_to_install(tmp_path):
    env = {**os.environ, "CAPSCALE_HOME": str(tmp_path / "empty")}
    proc = _cli("train", "--preset", "smoke", "--out", str(tmp_path / "r"), env=env)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "python -m capscale.train.corpus fetch" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "override,match",
    [
        ("optimizer=lion", "unknown optimizer 'lion'"),
        ("model.ffn_width=0", "FFN width must be"),
        ("train.nope=1", r"unknown config key\(s\) \['train.nope'\]"),
        ("optimizer.params.rank_fraction=0.5", "unknown hyperparameter"),
    ],
)
def test_bad_config_is_refused_before_anything_is_written(tmp_path, override, match):
    proc = _cli("train", "--preset", "smoke", "--set", override, "--out", str(tmp_path / "r"))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert pytest.importorskip("re").search(match, err), err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "over, width",
    [
        ({"model.ffn_width": 48}, 48),  # absolute width replaces the preset's multiple
        ({"model.ffn_width": 48, "model.ffn_mult": None}, 48),  # clearing the multiple keeps the width
        ({"model.ffn_mult": None, "model.ffn_width": 48}, 48),
        ({"model.ffn_width": 48, "model.ffn_mult": 2}, 64),  # the later override wins (2 × d_model 32)
        ({"model.ffn_mult": None}, 128),  # neither given: 4 × d_model
    ],
)
def test_ffn_width_overrides(over, width):
    assert resolve("smoke", overrides=over).model_config().ffn_dim == width


def test_unknown_preset(tmp_path):
    proc = _cli("train", "--preset", "huge", "--out", str(tmp_path / "r"))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "unknown preset 'huge'" in err


def test_torchrun_two_processes_log_one_set_of_telemetry(tmp_path):
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_port=29517",
            "-m",
            "capscale",
            "train",
            "--preset",
            "smoke",
            "--set",
            "train.steps=10",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = _metrics(out)
    assert [r["step"] for r in m] == [5, 10]
    spectra = pd.read_parquet(out / "spectra.parquet")
    keys = spectra[["step", "layer", "site", "bucket"]]
    assert not keys.duplicated().any()  # one set, written by rank 0 only
    # the reduced state covers both ranks' rows: 8 sequences per step (4 per rank) × 32 tokens
    # × a window of 2 steps
    row = spectra[(spectra.step == 0) & (spectra.bucket == "all")].iloc[0]
    assert row["n_samples"] == 8 * 32 * 2


@pytest.mark.parametrize("name", ["adamw", "muon", "normuon", "dion", "shampoo"])
def test_every_optimizer_trains_the_smoke_preset(tmp_path, name):
    out = tmp_path / name
    status = train(
        resolve("smoke", overrides=[f"optimizer={name}", "telemetry.enabled=false"]), out, log=lambda _m: None
    )
    assert status["status"] == "done"
    evals = [r["val_loss"] for r in _metrics(out) if "val_loss" in r]
    assert evals[0] > evals[1] > evals[2], evals


def test_checkpoints_wait_for_open_windows_and_resume_from_them_exactly(tmp_path):
    # windows [10, 14) and [20, 24): the checkpoint due at 12 waits until 14
    over = ["telemetry.every=10", "telemetry.window=4", "train.checkpoint_every=12", "train.keep_checkpoints=10"]
    ref = tmp_path / "ref"
    train(resolve("smoke", overrides=over), ref, log=lambda _m: None)
    assert [p.name for p in sorted((ref / "checkpoints").iterdir())] == [
        "step_00000014.pt",
        "step_00000024.pt",
        "step_00000030.pt",
    ]
    # resume from the postponed checkpoint: drop what came after it, as a crash would
    out = tmp_path / "resumed"
    import shutil

    shutil.copytree(ref, out)
    for name in ("step_00000024.pt", "step_00000030.pt"):
        (out / "checkpoints" / name).unlink()
    (out / "status.json").write_text(json.dumps({"status": "running", "step": 14, "reason": None}))
    train(resolve("smoke", overrides=over), out, log=lambda _m: None)
    assert _no_timing(_metrics(out)) == _no_timing(_metrics(ref))
    pd.testing.assert_frame_equal(pd.read_parquet(out / "spectra.parquet"), pd.read_parquet(ref / "spectra.parquet"))
    window = pd.read_parquet(ref / "spectra.parquet")
    row = window[(window.step == 10) & (window.bucket == "all") & (window.site == "pre") & (window.layer == 0)]
    assert int(row["n_samples"].iloc[0]) == 4 * 8 * 32  # the whole 4-step window, none lost to the due checkpoint


def test_background_telemetry_writes_the_same_run_and_every_window_before_its_checkpoint(tmp_path, monkeypatch):
    """telemetry.background decomposes windows on a worker thread: the spectra and metrics are
    those of the synchronous run; each checkpoint waits for the windows that closed before it
    (a resume from it would never measure them again); a run may resume with it toggled."""
    import capscale.train.loop as loop

    over = ["telemetry.every=10", "telemetry.window=4", "train.checkpoint_every=14", "train.keep_checkpoints=10"]
    ref = tmp_path / "ref"
    train(resolve("smoke", overrides=over), ref, log=lambda _m: None)
    seen = []
    real = loop._checkpoint

    def checkpoint(s, step):
        spectra = s.run.path / "spectra.parquet"
        seen.append((step, sorted(pd.read_parquet(spectra).step.unique()) if spectra.exists() else []))
        real(s, step)

    monkeypatch.setattr(loop, "_checkpoint", checkpoint)
    bg = tmp_path / "bg"
    train(resolve("smoke", overrides=[*over, "telemetry.background=host"]), bg, log=lambda _m: None)
    # windows [0,4) [10,14) [20,24) and the final [26,30)
    assert seen == [(14, [0, 10]), (30, [0, 10, 20, 26])]  # the one due at 28 waits for [26, 30)
    assert json.loads((bg / "config.json").read_text())["telemetry"]["background"] == "host"
    assert _no_timing(_metrics(bg)) == _no_timing(_metrics(ref))
    pd.testing.assert_frame_equal(pd.read_parquet(bg / "spectra.parquet"), pd.read_parquet(ref / "spectra.parquet"))
    # the finished synchronous run, asked again with background on, is the same run: a no-op
    again = train(resolve("smoke", overrides=[*over, "telemetry.background=true"]), ref, log=lambda _m: None)
    assert again["status"] == "done"


@pytest.mark.parametrize("every", [10, 1])
def test_diverged_means_the_same_at_every_telemetry_cadence(tmp_path, every):
    """Non-finite activations (caught by the probe when it measures every step) are a divergence too."""
    out = tmp_path / f"every{every}"
    over = ["lr=1e12", "train.steps=10", f"telemetry.every={every}", "telemetry.window=1"]
    status = train(resolve("smoke", overrides=over), out, log=lambda _m: None)
    st = json.loads((out / "status.json").read_text())
    assert status["status"] == st["status"] == "diverged", st
    assert status["step"] == st["step"] and 1 <= st["step"] <= 10
    assert "non-finite" in st["reason"]
    # finished: running it again does not retry it
    assert train(resolve("smoke", overrides=over), out, log=lambda _m: None)["status"] == "diverged"


def test_metrics_are_on_disk_at_every_log_step_and_progress_is_plain_lines(tmp_path):
    """`tail -f metrics.jsonl` follows the run: each log step is written before the next step,
    not at the next checkpoint; outside a terminal, progress is one log line per log step."""
    out = tmp_path / "flush"
    seen: list[tuple[str, int]] = []

    def log(msg: str) -> None:
        if msg.startswith("step "):
            on_disk = _metrics(out)
            seen.append((msg, on_disk[-1]["step"] if on_disk else 0))

    over = ["train.steps=12", "train.log_every=2", "train.checkpoint_every=100", "train.progress=true"]
    over += ["telemetry.enabled=false"]
    cfg = resolve("smoke", overrides=over)
    before = cfg.to_dict()
    train(cfg, out, log=log)
    assert cfg.to_dict() == before  # the loop works on a copy with the tokenizer's vocabulary
    assert json.loads((out / "config.json").read_text())["model"]["vocab_size"] != before["model"]["vocab_size"]
    assert [int(m.split()[1].split("/")[0]) for m, _ in seen] == [2, 4, 6, 8, 10, 12]
    assert all(m.split()[1].split("/")[0] == str(step) for m, step in seen), seen
    assert all("\r" not in m and m.split()[1].endswith("/12") for m, _ in seen)


def test_full_disk_keeps_the_checkpointed_step_and_resume_names_damage(tmp_path, monkeypatch):
    # issue 30, items 9 and 10
    import errno

    from capscale.rundir import RunDir

    over = ["train.steps=20", "train.checkpoint_every=10", "train.log_every=5", "telemetry.every=5"]
    cfg = resolve("smoke", overrides=over)
    out = tmp_path / "r"
    append = RunDir.append_metrics

    def full_disk(self, records):
        if any(r["step"] > 12 for r in records):
            raise OSError(errno.ENOSPC, "No space left on device")
        append(self, records)

    monkeypatch.setattr(RunDir, "append_metrics", full_disk)
    with pytest.raises(OSError, match="No space left"):
        train(cfg, out, log=lambda _m: None)
    monkeypatch.undo()
    status = json.loads((out / "status.json").read_text())
    assert (status["status"], status["step"]) == ("failed", 10)  # not "failed at step 0"

    # a metrics line whose step is no integer: one line, the file left as it was
    metrics = (out / "metrics.jsonl").read_text()
    (out / "metrics.jsonl").write_text(metrics.replace('{"step": 5,', '{"step": "x",', 1))
    damaged = (out / "metrics.jsonl").read_bytes()
    with pytest.raises(ValueError, match=r"metrics.jsonl record 1: 'step' must be an integer, got 'x'"):
        train(cfg, out, log=lambda _m: None)
    assert (out / "metrics.jsonl").read_bytes() == damaged
    (out / "metrics.jsonl").write_text(metrics)

    # a damaged middle spectra part: the resume names it and finishes
    part = sorted((out / "spectra.parquet").glob("part-00000001-*"))[0]
    part.write_bytes(b"garbage")
    said = []
    status = train(cfg, out, log=said.append)
    assert status["status"] == "done"
    assert any(f"spectra part {part} is damaged" in line for line in said), said
