"""The training loop: config → run directory, resumable, with telemetry attached.

Step numbering: ``step`` in ``metrics.jsonl`` counts completed optimizer updates
(1…steps): its ``loss`` is the training loss of the batch that made update
``step``, its ``val_loss`` is measured after it. Spectra are recorded by the probe
at the forward passes of iteration ``step`` (weights after ``step`` updates).
Checkpoints hold everything needed to continue bit-identically; re-running the
same command on the same directory resumes from the newest one.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import sys
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
from capscale.probe.accumulate import NonFiniteActivationError
from capscale.probe.sinks import Sink
from capscale.rundir import LOCK_HELD_ENV, RunStatus
from capscale.runowner import RunOwner
from capscale.spectrum import FrequencyTable
from capscale.train.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from capscale.train.config import RunConfig, TrainConfig, run_identity
from capscale.train.data import TokenData, load_data
from capscale.train.model import GPT
from capscale.train.optim import HybridOptimizer, build_optimizer
from capscale.train.schedule import lr_factor

_LOG = logging.getLogger("capscale.train")


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


def _owner(out) -> RunOwner:
    return RunOwner(out, what="config", advice="use another --out")


class Diverged(RuntimeError):
    """The run diverged (non-finite loss or activations) at optimizer update ``step``."""

    def __init__(self, reason: str, step: int):
        super().__init__(reason)
        self.reason, self.step = reason, step


def _device_kind(t: TrainConfig) -> str:
    """The device type the run will use; one clear line if this machine cannot give it."""
    name, cuda = t.device, torch.cuda.is_available()
    if name.startswith("cuda"):
        if not cuda:
            raise ValueError(f"train.device={name}, but CUDA is not available here: use auto or cpu")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(f"train.device={name}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("train.device=mps, but MPS is not available here: use auto or cpu")
    kind = "cuda" if name.startswith("cuda") or (name == "auto" and cuda) else ("mps" if name == "mps" else "cpu")
    if t.dtype == "bfloat16" and kind != "cuda":
        raise ValueError("train.dtype=bfloat16 is bf16 autocast on CUDA; on CPU use float32")
    return kind


def _micro_batches(t: TrainConfig, d: Dist) -> tuple[int, int]:
    """(sequences per forward on one rank, micro-batches per optimizer step).

    batch_size counts sequences per optimizer step over all ranks and micro-batches;
    micro_batch_size is one forward on one rank (default: no accumulation).
    """
    micro = t.micro_batch_size or t.batch_size // d.world_size
    if micro < 1 or t.batch_size % (micro * d.world_size):
        raise ValueError(
            f"train.batch_size ({t.batch_size}) must be a multiple of micro_batch_size ({micro}) "
            f"x world size ({d.world_size})"
        )
    return micro, t.batch_size // (micro * d.world_size)


def train(cfg: RunConfig, out: str | Path, *, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run (or resume) ``cfg`` in directory ``out``; returns the final status dict.

    ``log`` receives the run's messages (default: the ``capscale.train`` logger).
    Everything that can be refused is refused before the run directory is touched.
    One process writes a run directory at a time: a second ``train`` on it is
    refused at once (``RunLockedError`` naming the holder); rank 0 holds the lock.
    """
    # Rank 0 takes the lock, unless the process that launched these ranks holds it for them.
    held = os.environ.get(LOCK_HELD_ENV) == os.path.realpath(out)
    with _owner(out).lock() if int(os.environ.get("RANK", "0")) == 0 and not held else nullcontext():
        return _train(cfg, out, log=log)


def _train(cfg: RunConfig, out: str | Path, *, log: Callable[[str], None] | None) -> dict[str, Any]:
    d = _init_distributed(_device_kind(cfg.train))
    device = _device(cfg.train.device, d)
    micro, accum = _micro_batches(cfg.train, d)
    owner = _owner(out)
    run = owner.run
    say = (log or _LOG.info) if d.main else (lambda _msg: None)

    # Data first: the tokenizer decides the model's vocabulary. Rank 0 builds caches.
    if d.main:
        data = load_data(cfg.data, log=say)
    if d.world_size > 1:
        dist.barrier()
    if not d.main:
        data = load_data(cfg.data)
    cfg = cfg.with_vocab(data.model_vocab_size)
    resolved = {**cfg.to_dict(), "versions": _versions()}

    owner.refuse_other_run(resolved, run_identity, name_keys=True)
    status = run.read_status()
    if status and RunStatus(status["status"]).finished:
        say(f"{run.path}: already {status['status']} at step {status['step']}")
        return status
    if d.main:
        owner.begin(resolved)

    state = _setup(cfg, resolved, owner, d, device, data, micro, accum, say)
    try:
        final = _loop(state)
    except Diverged as exc:
        final = {"status": RunStatus.DIVERGED.value, "step": exc.step, "reason": exc.reason}
        if d.main:
            owner.set_status(RunStatus.DIVERGED, exc.step, exc.reason)
        say(f"diverged: {exc.reason}")
    except BaseException as exc:
        if d.main and not isinstance(exc, KeyboardInterrupt):
            # the step a resume would start from: the newest checkpoint, not where this process began
            ckpts = list_checkpoints(run.checkpoint_dir)
            step = max(state.start, ckpts[-1][0]) if ckpts else state.start
            try:
                owner.set_status(RunStatus.FAILED, step, f"{type(exc).__name__}: {exc}")
            except OSError:  # a full disk may refuse this write too: the last status (its step) stands
                pass
        raise
    finally:
        if state.probe is not None:
            state.probe.close(flush=False)
    return final


@dataclass
class RunState:
    """Everything one run trains with, made once by :func:`_setup` (torchtitan's ``Trainer``, in spirit)."""

    cfg: RunConfig  # with the tokenizer's vocabulary
    resolved: dict  # what config.json holds
    owner: RunOwner  # the run directory's life cycle (its files: .run)
    dist: Dist
    device: torch.device
    data: TokenData
    freq: FrequencyTable
    raw_model: GPT
    model: torch.nn.Module  # raw_model, or its DistributedDataParallel wrapper
    opt: HybridOptimizer
    probe: Any  # capscale.probe.Probe, or None with telemetry off
    sink: _Collect | None
    micro: int  # sequences per forward on this rank
    accum: int  # forwards per optimizer step
    start: int  # optimizer updates already done (resume point)
    say: Callable[[str], None]

    @property
    def run(self):
        return self.owner.run

    @property
    def seq(self) -> int:
        return self.cfg.model.seq_len

    def autocast(self):
        """A fresh context per use; bf16 autocast only on CUDA (checked at start)."""
        if self.cfg.train.dtype == "bfloat16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()


def _setup(
    cfg: RunConfig,
    resolved: dict,
    owner: RunOwner,
    d: Dist,
    device: torch.device,
    data: TokenData,
    micro: int,
    accum: int,
    say: Callable[[str], None],
) -> RunState:
    """Model, optimizer and probe, restored from the newest checkpoint if there is one."""
    run = owner.run
    freq = data.frequency_table()
    torch.manual_seed(cfg.train.seed)
    raw_model = GPT(cfg.model).to(device)
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
        for part, why in run.damaged_spectra_parts():  # its window is lost; the report names it too
            say(f"warning: spectra part {part} is damaged ({why}); its window is left out of the report")
    if d.main:  # drop anything logged after the checkpoint: it will be redone identically
        run.truncate_metrics(start)
        run.truncate_spectra(start - 1)
        owner.set_status(RunStatus.RUNNING, start)

    # Checkpoints fall between measurement windows, so a probe re-attached at the
    # resume step rebuilds exactly the windows an uninterrupted run would have.
    probe, sink = _attach_probe(cfg, raw_model, freq, start)
    model = raw_model
    if d.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            raw_model, device_ids=[device.index] if device.type == "cuda" else None
        )
    return RunState(
        cfg, resolved, owner, d, device, data, freq, raw_model, model, opt, probe, sink, micro, accum, start, say
    )


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
        model, config=tel, freq_table=freq, total_steps=cfg.train.steps, start_step=start, sinks=[sink], mode="train"
    )
    return probe, sink


def _mid_window(probe) -> bool:
    """True if a measurement window opened before the current step is still open: a
    checkpoint now would split it, so the loop waits until it closes."""
    start = probe.window_start
    return start is not None and start < probe.step_index


class _Progress:
    """A tqdm bar in a terminal; elsewhere (logs, sweep workers) one plain line per log step."""

    def __init__(self, s: RunState):
        t, self.say, self.total = s.cfg.train, s.say, s.cfg.train.steps
        self.enabled = t.progress and s.dist.main
        self.bar = None
        if self.enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=t.steps, initial=s.start, desc=s.cfg.name, unit="step", dynamic_ncols=True)

    def step(self, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}")

    def logged(self, rec: dict) -> None:
        if self.enabled and self.bar is None:
            extra = f" val_loss {rec['val_loss']:.4f}" if "val_loss" in rec else ""
            self.say(
                f"step {rec['step']}/{self.total} loss {rec['loss']:.4f}{extra} "
                f"lr {rec['lr']:.3g} {rec['tokens_per_s']:,.0f} tok/s"
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _train_step(s: RunState, it: int) -> float:
    """Forward and backward of every micro-batch of iteration ``it``; returns the mean loss (all ranks)."""
    d = s.dist
    s.model.train()
    loss_sum = torch.zeros((), device=s.device)
    for m in range(s.accum):
        x, y = s.data.train_batch(
            s.micro,
            s.seq,
            seed=s.cfg.train.seed,
            step=it,
            micro_step=m,
            rank=d.rank,
            world_size=d.world_size,
            device=s.device,
        )
        sync = s.model.no_sync() if (d.world_size > 1 and m < s.accum - 1) else nullcontext()
        try:
            with sync, s.autocast():
                _, loss = s.model(x, y)
                (loss / s.accum).backward()
        except NonFiniteActivationError as exc:
            # the same meaning as a non-finite loss, whatever the telemetry cadence
            reason = f"non-finite activations (NaN or Inf) at layer {exc.layer} {exc.site} at step {it + 1}"
            raise Diverged(reason, it + 1) from exc
        loss_sum += loss.detach()
    if s.cfg.train.grad_clip:
        torch.nn.utils.clip_grad_norm_(s.raw_model.parameters(), s.cfg.train.grad_clip)
    loss_val = float(loss_sum) / s.accum
    if d.world_size > 1:
        lt = torch.tensor([loss_val], device=s.device)
        dist.all_reduce(lt)
        loss_val = float(lt) / d.world_size
    return loss_val


def _checkpoint(s: RunState, step: int) -> None:
    if s.dist.main:
        payload = {
            "model": s.raw_model.state_dict(),
            "optimizer": s.opt.state_dict(),
            "rng": rng_state(),
            "model_config": s.resolved["model"],
            "optimizer_config": s.resolved["optimizer"],
        }
        save_checkpoint(s.run.checkpoint_dir, step, payload, keep=s.cfg.train.keep_checkpoints)
        s.owner.set_status(RunStatus.RUNNING if step < s.cfg.train.steps else RunStatus.DONE, step)
    if s.dist.world_size > 1:
        dist.barrier()


def _write_spectra(s: RunState) -> None:
    frame = s.sink.take()
    if s.dist.main and frame is not None:
        s.run.append_spectra(frame)


def _loop(s: RunState) -> dict[str, Any]:
    t, main = s.cfg.train, s.dist.main
    progress = _Progress(s)
    due = False  # a checkpoint waiting for a measurement window to close
    layout_said = False  # the probe's state layout, said once it is chosen (at its first measured forward)
    tokens_since, t_since = 0, time.perf_counter()
    for it in range(s.start, t.steps):
        factor = lr_factor(it, t.steps, kind=t.schedule, warmup=t.warmup_steps, warmdown_frac=t.warmdown_frac)
        for group in s.opt.param_groups:
            group["lr"] = group["base_lr"] * factor
        loss_val = _train_step(s, it)
        step = it + 1
        if not math.isfinite(loss_val):
            if main:
                s.run.append_metrics([{"step": step, "loss": loss_val, "lr": s.opt.param_groups[0]["lr"]}])
            raise Diverged(f"non-finite training loss ({loss_val}) at step {step}", step)
        s.opt.step()
        s.opt.zero_grad(set_to_none=True)
        if s.probe is not None:
            s.probe.step()
            _write_spectra(s)
            if not layout_said and s.probe.layout is not None:
                layout_said = True
                s.say(f"telemetry {s.probe.layout_note}")
        tokens_since += t.batch_size * s.seq
        progress.step(loss_val)

        is_eval = step % t.eval_every == 0 or step == t.steps
        if step % t.log_every == 0 or is_eval:
            now = time.perf_counter()
            rec = {
                "step": step,
                "loss": loss_val,
                "lr": s.opt.param_groups[0]["lr"],
                "tokens_per_s": tokens_since / max(now - t_since, 1e-9),
            }
            if is_eval:
                rec.update(evaluate(s))
            if main:  # at every log step, so `tail -f metrics.jsonl` follows the run
                s.run.append_metrics([rec])
            progress.logged(rec)
            tokens_since, t_since = 0, time.perf_counter()
        due = due or step % t.checkpoint_every == 0
        if (due and not (s.probe is not None and _mid_window(s.probe))) or step == t.steps:
            due = False
            if s.probe is not None and s.probe.pending:
                # rows still being decomposed in the background belong before this checkpoint:
                # a resume from it never measures their windows again
                s.probe.wait()
                _write_spectra(s)
            _checkpoint(s, step)
    progress.close()
    if main:  # also when resuming a run whose last checkpoint was already the final one
        s.owner.set_status(RunStatus.DONE, t.steps)
    return {"status": RunStatus.DONE.value, "step": t.steps, "reason": None}


@torch.no_grad()
def evaluate(s: RunState) -> dict[str, float]:
    """Validation loss overall and per HEAD/MID/TAIL bucket of the *target* token."""
    d, device = s.dist, s.device
    s.model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # all, head, mid, tail
    counts = torch.zeros(4, dtype=torch.float64, device=device)
    n = min(s.cfg.train.eval_batches, s.data.num_val_batches(s.micro, s.seq, d.world_size))
    if n < 1:
        raise ValueError(f"the validation split is too small for one batch of {s.micro}x{s.seq}")
    # eval-mode forwards are not captured: the probe (mode="train") measures training forwards
    for x, y in s.data.val_batches(s.micro, s.seq, n, rank=d.rank, world_size=d.world_size, device=device):
        with s.autocast():
            _, tok_loss = s.raw_model(x, y, reduction="none")
        tok_loss = tok_loss.double().reshape(-1)
        b = s.freq.bucket(y.reshape(-1)).long()
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
    s.model.train()
    return out
