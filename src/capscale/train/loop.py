"""The training loop: config → run directory, resumable, with telemetry attached.

Step numbering: ``step`` in ``metrics.jsonl`` counts completed optimizer updates
(1…steps): its ``loss`` is the training loss of the batch that made update
``step``, its ``val_loss`` is measured after it. Spectra are recorded by the probe
at the forward passes of iteration ``step`` (weights after ``step`` updates).
Checkpoints hold everything needed to continue bit-identically; re-running the
same command on the same directory resumes from the newest one.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import capscale
from capscale.probe.sinks import Sink
from capscale.rundir import RunDir, RunStatus
from capscale.train.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from capscale.train.config import RunConfig
from capscale.train.data import TokenData, load_data
from capscale.train.model import GPT
from capscale.train.optim import build_optimizer
from capscale.train.schedule import lr_factor

# Keys that may differ between the first launch of a run and its resumption.
_VOLATILE = ("versions",)


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_kind: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _device(name: str, d: Dist) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", d.local_rank)
    return dev


def _versions() -> dict[str, str]:
    return {
        "capscale": capscale.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _comparable(cfg: dict) -> dict:
    out = {k: v for k, v in cfg.items() if k not in _VOLATILE}
    out["train"] = {k: v for k, v in out.get("train", {}).items() if k != "progress"}
    return out


def _diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += _diff_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(prefix + k)
    return keys


class Diverged(RuntimeError):
    pass


def train(cfg: RunConfig, out: str | Path, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) ``cfg`` in directory ``out``; returns the final status dict.

    One process writes a run directory at a time: a second ``train`` on it is
    refused at once (``RunLockedError`` naming the holder); rank 0 holds the lock.
    """
    with RunDir(out).lock() if int(os.environ.get("RANK", "0")) == 0 else nullcontext():
        return _train(cfg, out, log=log)


def _train(cfg: RunConfig, out: str | Path, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    d = _init_distributed(
        "cuda"
        if (cfg.train.device == "auto" and torch.cuda.is_available()) or cfg.train.device.startswith("cuda")
        else "cpu"
    )
    device = _device(cfg.train.device, d)
    if cfg.train.dtype == "bfloat16" and device.type != "cuda":
        raise ValueError("train.dtype=bfloat16 is for CUDA; on CPU bf16 matmul is ~100x slower: use float32")
    run = RunDir(out)
    say = log if d.main else (lambda _msg: None)

    # Data first: the tokenizer decides the model's vocabulary. Rank 0 builds caches.
    if d.main:
        data = load_data(cfg.data, log=say)
    if d.world_size > 1:
        dist.barrier()
    if not d.main:
        data = load_data(cfg.data)
    cfg.model["vocab_size"] = data.model_vocab_size
    cfg.validate()
    resolved = {**cfg.to_dict(), "versions": _versions()}

    existing = run.read_config()
    if existing is not None and _comparable(existing) != _comparable(resolved):
        raise ValueError(
            f"{run.path} holds a run with a different config (differs in "
            f"{_diff_keys(_comparable(existing), _comparable(resolved))}); use another --out"
        )
    status = run.read_status()
    if status and RunStatus(status["status"]).finished:
        say(f"{run.path}: already {status['status']} at step {status['step']}")
        return status
    if d.main:
        run.create()
        run.write_config(resolved)

    freq = data.frequency_table()
    torch.manual_seed(cfg.train.seed)
    raw_model = GPT(cfg.model_config()).to(device)
    opt = build_optimizer(cfg.optimizer.name, raw_model, **cfg.optimizer.params)
    start = 0
    ckpts = list_checkpoints(run.checkpoint_dir)
    if ckpts:
        step0, path = ckpts[-1]
        ckpt = load_checkpoint(path, config=resolved)
        raw_model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        start = step0
        say(f"resuming {run.path} from step {start}")
    if d.main:  # drop anything logged after the checkpoint: it will be redone identically
        run.truncate_metrics(start)
        run.truncate_spectra(start - 1)
        run.write_status(RunStatus.RUNNING, start)

    # Checkpoints fall between measurement windows, so a probe re-attached at the
    # resume step rebuilds exactly the windows an uninterrupted run would have.
    probe, sink = _attach_probe(cfg, raw_model, freq, start)
    model = raw_model
    if d.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            raw_model, device_ids=[device.index] if device.type == "cuda" else None
        )
    try:
        final = _loop(cfg, resolved, model, raw_model, opt, probe, sink, data, freq, run, d, device, start, say)
    except Diverged as exc:
        final = {"status": RunStatus.DIVERGED.value, "step": exc.args[1], "reason": exc.args[0]}
        if d.main:
            run.write_status(RunStatus.DIVERGED, exc.args[1], exc.args[0])
        say(f"diverged: {exc.args[0]}")
    except BaseException as exc:
        if d.main and not isinstance(exc, KeyboardInterrupt):
            run.write_status(RunStatus.FAILED, start, f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if probe is not None:
            probe.close(flush=False)
    return final


class _Collect(Sink):
    """A probe sink that holds finished spectra until the loop writes them to the run dir."""

    def __init__(self) -> None:
        self.frames: list = []

    def write_spectra(self, frame) -> None:
        if frame is not None and not frame.empty:
            self.frames.append(frame)

    def take(self):
        import pandas as pd

        frames, self.frames = self.frames, []
        return pd.concat(frames, ignore_index=True) if frames else None


def _attach_probe(cfg: RunConfig, model: GPT, freq, start: int):
    tel = cfg.telemetry
    if not tel.enabled:
        return None, None
    from capscale.probe import attach

    sink = _Collect()
    probe = attach(
        model,
        sites=tuple(tel.sites),
        freq_table=freq if tel.buckets else None,
        every=tel.every,
        window=tel.window,
        dtype=tel.dtype,
        monitor_every=tel.monitor_every,
        total_steps=cfg.train.steps,
        start_step=start,
        sinks=[sink],
        mode="train",
    )
    return probe, sink


def _mid_window(probe) -> bool:
    """True if a measurement window opened before the current step is still open: a
    checkpoint now would split it, so the loop waits until it closes."""
    start = probe.window_start
    return start is not None and start < probe.step_index


def _loop(
    cfg,
    resolved: dict,
    model,
    raw_model,
    opt,
    probe,
    sink,
    data: TokenData,
    freq,
    run: RunDir,
    d: Dist,
    device: torch.device,
    start: int,
    say,
) -> dict[str, Any]:
    t = cfg.train
    # batch_size counts sequences per optimizer step over all ranks and micro-batches;
    # micro_batch_size is one forward on one rank (default: no accumulation).
    micro = t.micro_batch_size or t.batch_size // d.world_size
    if micro < 1 or t.batch_size % (micro * d.world_size):
        raise ValueError(
            f"train.batch_size ({t.batch_size}) must be a multiple of micro_batch_size ({micro}) "
            f"x world size ({d.world_size})"
        )
    accum = t.batch_size // (micro * d.world_size)
    seq = cfg.model_config().seq_len

    def autocast():  # a fresh context per use; bf16 autocast only on CUDA (checked at start)
        return torch.autocast("cuda", dtype=torch.bfloat16) if t.dtype == "bfloat16" else nullcontext()

    bar = None
    if t.progress and d.main:
        from tqdm.auto import tqdm

        bar = tqdm(total=t.steps, initial=start, desc=cfg.name, unit="step", dynamic_ncols=True)

    pending: list[dict] = []
    due = False  # a checkpoint waiting for a measurement window to close
    tokens_since, t_since = 0, time.perf_counter()
    for it in range(start, t.steps):
        factor = lr_factor(it, t.steps, kind=t.schedule, warmup=t.warmup_steps, warmdown_frac=t.warmdown_frac)
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * factor
        model.train()
        loss_sum = torch.zeros((), device=device)
        for m in range(accum):
            x, y = data.train_batch(
                micro, seq, seed=t.seed, step=it, micro_step=m, rank=d.rank, world_size=d.world_size, device=device
            )
            sync = model.no_sync() if (d.world_size > 1 and m < accum - 1) else nullcontext()
            with sync, autocast():
                _, loss = model(x, y)
                (loss / accum).backward()
            loss_sum += loss.detach()
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), t.grad_clip)
        loss_val = float(loss_sum) / accum
        if d.world_size > 1:
            lt = torch.tensor([loss_val], device=device)
            dist.all_reduce(lt)
            loss_val = float(lt) / d.world_size
        step = it + 1
        if not math.isfinite(loss_val):
            if d.main:
                run.append_metrics(pending + [{"step": step, "loss": loss_val, "lr": opt.param_groups[0]["lr"]}])
            raise Diverged(f"non-finite training loss ({loss_val}) at step {step}", step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if probe is not None:
            probe.step()
            frame = sink.take()
            if d.main and frame is not None:
                run.append_spectra(frame)
        tokens_since += t.batch_size * seq
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_val:.3f}")

        is_eval = step % t.eval_every == 0 or step == t.steps
        if step % t.log_every == 0 or is_eval:
            now = time.perf_counter()
            rec = {
                "step": step,
                "loss": loss_val,
                "lr": opt.param_groups[0]["lr"],
                "tokens_per_s": tokens_since / max(now - t_since, 1e-9),
            }
            if is_eval:
                rec.update(evaluate(model, raw_model, data, freq, micro, seq, t.eval_batches, d, device, autocast))
            pending.append(rec)
            tokens_since, t_since = 0, time.perf_counter()
        due = due or step % t.checkpoint_every == 0
        if (due and not (probe is not None and _mid_window(probe))) or step == t.steps:
            due = False
            if d.main:
                run.append_metrics(pending)
                payload = {
                    "model": raw_model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "rng": rng_state(),
                    "model_config": resolved["model"],
                    "optimizer_config": resolved["optimizer"],
                }
                save_checkpoint(run.checkpoint_dir, step, payload, keep=t.keep_checkpoints)
                run.write_status(RunStatus.RUNNING if step < t.steps else RunStatus.DONE, step)
            pending = []
            if d.world_size > 1:
                dist.barrier()
    if bar is not None:
        bar.close()
    if d.main:  # also when resuming a run whose last checkpoint was already the final one
        run.write_status(RunStatus.DONE, t.steps)
    return {"status": RunStatus.DONE.value, "step": t.steps, "reason": None}


@torch.no_grad()
def evaluate(
    model, raw_model, data: TokenData, freq, batch: int, seq: int, n_batches: int, d: Dist, device, autocast
) -> dict[str, float]:
    """Validation loss overall and per HEAD/MID/TAIL bucket of the *target* token."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # all, head, mid, tail
    counts = torch.zeros(4, dtype=torch.float64, device=device)
    n = min(n_batches, data.num_val_batches(batch, seq, d.world_size))
    if n < 1:
        raise ValueError(f"the validation split is too small for one batch of {batch}x{seq}")
    # eval-mode forwards are not captured: the probe (mode="train") measures training forwards
    for x, y in data.val_batches(batch, seq, n, rank=d.rank, world_size=d.world_size, device=device):
        with autocast():
            _, tok_loss = raw_model(x, y, reduction="none")
        tok_loss = tok_loss.double().reshape(-1)
        b = freq.bucket(y.reshape(-1)).long()
        sums[0] += tok_loss.sum()
        counts[0] += tok_loss.numel()
        sums[1:] += torch.zeros(3, dtype=torch.float64, device=device).index_add_(0, b, tok_loss)
        counts[1:] += torch.bincount(b, minlength=3).double()
    if d.world_size > 1:
        dist.all_reduce(sums)
        dist.all_reduce(counts)
    mean = (sums / counts.clamp(min=1)).tolist()
    out = {"val_loss": mean[0]}
    for i, name in enumerate(("head", "mid", "tail"), start=1):
        out[f"val_loss_{name}"] = mean[i] if counts[i] > 0 else float("nan")
    model.train()
    return out
