"""Plasticity: continue a finished run on a second domain and record how well it keeps learning.

``continue_run`` loads a run's final checkpoint (model and optimizer state) and trains it
for K more steps on another corpus, with the run's own optimizer and hyperparameters at a
constant learning rate (``lr_scale`` × the run's base rates: the run itself ended its
warmdown at 0), telemetry on. The second corpus is read with the **run's own tokenizer**
(a byte-level BPE fitted on the first corpus stays that one), so the model's vocabulary and
embeddings keep their meaning.

The output is a run directory in the standard format (``config.json`` with a
``plasticity`` section, ``metrics.jsonl``, ``spectra.parquet`` of the continuation's
windows, ``status.json``) plus ``plasticity.json``:

- **adaptation**: the new domain's validation loss at step 0 and after K steps, their
  difference, and the area under its curve (the mean over [0, K] by the trapezoid rule,
  over the evaluation steps): lower = faster adaptation;
- **forgetting**: the original validation split's loss after K steps minus at step 0;
- **capacity before / after**: soft and hard rank and ``dormant_frac`` of every layer and
  site (median over layers, all tokens), measured on the same fixed batches of the new
  domain's validation split before and after (``measure_model``, eval mode, float64), and
  their change.

``continue_hf`` does the same for a Hugging Face causal LM (loaded as ``capscale measure``
loads a model directory; the CLI does the loading): its own tokenizer reads the corpus, and
as the directory holds no optimizer state the optimizer is a fresh AdamW (``HFOptions``,
stated in the output); forgetting needs the original corpus to be named (``orig_data``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from capscale.atomic import atomic_write_text
from capscale.probe import attach, measure_model
from capscale.probe.sinks import Sink
from capscale.rundir import RunDir, RunStatus
from capscale.train.checkpoint import list_checkpoints, load_checkpoint
from capscale.train.config import RunConfig
from capscale.train.data import TokenData, load_data, prepare_tokens
from capscale.train.model import GPT
from capscale.train.optim import build_optimizer
from capscale.train.sources import make_source

SUMMARY_FILE = "plasticity.json"
CAPACITY_FILE = "plasticity_spectra.parquet"  # the before/after measurements


@dataclass(frozen=True)
class PlasticityConfig:
    """``steps``: K. ``eval_every``: None → K // 5 (≥ 1). ``eval_batches``/``telemetry_every``:
    None → the run's (the cadence clipped to K). ``max_tokens``: read at most this many tokens
    of the second corpus. ``measure_batches``: validation batches of the new domain measured
    before and after."""

    steps: int = 100
    lr_scale: float = 1.0
    eval_every: int | None = None
    eval_batches: int | None = None
    telemetry_every: int | None = None
    max_tokens: int | None = None
    measure_batches: int = 4

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive int, got {self.steps!r}")
        if not (isinstance(self.lr_scale, (int, float)) and math.isfinite(self.lr_scale) and self.lr_scale > 0):
            raise ValueError(f"lr_scale must be a finite number > 0, got {self.lr_scale!r}")
        for name in ("eval_every", "eval_batches", "telemetry_every", "max_tokens"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive int or None, got {v!r}")
        if self.measure_batches < 1:
            raise ValueError(f"measure_batches must be >= 1, got {self.measure_batches}")


class _Collect(Sink):
    def __init__(self) -> None:
        self.frames: list[pd.DataFrame] = []

    def write_spectra(self, frame) -> None:
        if frame is not None and not frame.empty:
            self.frames.append(frame)


def _run_config(config: dict) -> RunConfig:
    return RunConfig.from_dict({k: v for k, v in config.items() if k not in ("versions", "plasticity")})


@torch.no_grad()
def _val_loss(model: GPT, data: TokenData, batch: int, seq: int, n: int, device) -> float:
    model.eval()
    n = min(n, data.num_val_batches(batch, seq))
    if n < 1:
        raise ValueError(f"the validation split is too small for one batch of {batch}x{seq}")
    total = 0.0
    for x, y in data.val_batches(batch, seq, n, device=device):
        _, loss = model(x, y)
        total += float(loss)
    model.train()
    return total / n


def _capacity(frame: pd.DataFrame) -> dict[str, float]:
    """Median over layers of soft/hard rank and dormant_frac, per site, all tokens."""
    out = {}
    rows = frame[frame["bucket"] == "all"]
    for site, g in rows.groupby("site"):
        for col in ("soft_rank", "hard_rank", "dormant_frac"):
            out[f"{site}_{col}"] = float(g[col].median()) if col in g else math.nan
    return out


def _summary(records: list[dict], before: pd.DataFrame, after: pd.DataFrame) -> dict[str, Any]:
    """Adaptation, forgetting (None without an original split) and capacity before/after, from
    the evaluation records (step 0 first) and the two measurements."""
    steps = np.array([r["step"] for r in records], dtype=float)
    new_loss = np.array([r["val_loss"] for r in records])
    out: dict[str, Any] = {
        "val_loss_new_0": float(new_loss[0]),
        "val_loss_new_k": float(new_loss[-1]),
        "adaptation": float(new_loss[0] - new_loss[-1]),
        "auc_new": float(np.trapezoid(new_loss, steps) / steps[-1]),
    }
    orig = [r.get("val_loss_orig") for r in records]
    if orig[0] is None:
        out.update(val_loss_orig_0=None, val_loss_orig_k=None, forgetting=None)
    else:
        out.update(val_loss_orig_0=float(orig[0]), val_loss_orig_k=float(orig[-1]))
        out["forgetting"] = out["val_loss_orig_k"] - out["val_loss_orig_0"]
    cap0, cap1 = _capacity(before), _capacity(after)
    for k in cap0:
        out[f"{k}_0"], out[f"{k}_k"] = cap0[k], cap1[k]
        out[f"d_{k}"] = cap1[k] - cap0[k]
    return out


def _steps(
    model,
    opt,
    probe,
    sink,
    run,
    records,
    forward_backward,
    evaluate,
    *,
    K,
    eval_every,
    tokens_per_step,
    grad_clip,
    name,
    say,
) -> None:
    """The K steps on the second domain, the same for a harness run and a Hugging Face model:
    ``forward_backward(it)`` accumulates the gradients and returns the step's loss; a non-finite
    loss ends the run ``diverged``; spectra are written as the probe emits them, and ``evaluate``
    appends a metrics record every ``eval_every`` steps and at the last."""
    t0 = time.perf_counter()
    try:
        for it in range(K):
            loss_val = forward_backward(it)
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            if not math.isfinite(loss_val):
                run.write_status(RunStatus.DIVERGED, it + 1, f"non-finite loss at step {it + 1}")
                raise ValueError(f"{name}: diverged on the second domain at step {it + 1}")
            opt.step()
            opt.zero_grad(set_to_none=True)
            probe.step()
            step = it + 1
            for frame in sink.frames:
                run.append_spectra(frame)
            sink.frames.clear()
            if step % eval_every == 0 or step == K:
                tok_s = step * tokens_per_step / max(time.perf_counter() - t0, 1e-9)
                records.append(evaluate(step, loss_val, tok_s))
                run.append_metrics(records[-1:])
                say(step)
        probe.close(flush=True)
        for frame in sink.frames:
            run.append_spectra(frame)
    except BaseException:
        probe.close(flush=False)
        raise


def continue_run(
    run_dir: str | Path,
    data: str | dict,
    out: str | Path,
    config: PlasticityConfig = PlasticityConfig(),
    *,
    device: str = "cpu",
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Continue the finished run ``run_dir`` on corpus ``data`` (a source spec, see
    ``capscale.train.sources.make_source``) into the run directory ``out``; returns the summary."""
    say = log or (lambda _m: None)
    src = RunDir(run_dir)
    status = src.read_status()
    if not status or status.get("status") != RunStatus.DONE:
        raise ValueError(f"{run_dir}: not a finished run (status {status and status.get('status')!r})")
    resolved = src.read_config()
    ckpts = list_checkpoints(src.checkpoint_dir)
    if not ckpts:
        raise ValueError(f"{run_dir}: no checkpoint to continue from")
    from_step, path = ckpts[-1]
    cfg = _run_config(resolved)
    dev = torch.device(device)

    orig = load_data(cfg.data, log=say)
    tok = orig.tokenizer  # the run's own tokenizer reads the second corpus too
    source = make_source(data)
    shard = prepare_tokens(source, tok, max_tokens=config.max_tokens, log=say)
    new = TokenData(shard, tok, cfg.data.val_fraction)
    if shard.meta.get("source_fingerprint") == orig.shard.meta.get("source_fingerprint"):
        raise ValueError("the second corpus is the run's training corpus: plasticity needs another domain")

    ckpt = load_checkpoint(path, config=resolved)
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model).to(dev)
    model.load_state_dict(ckpt["model"])
    opt = build_optimizer(cfg.optimizer.name, model, **cfg.optimizer.params)
    opt.load_state_dict(ckpt["optimizer"])
    freq = orig.frequency_table()  # HEAD/MID/TAIL of the pretraining corpus: buckets stay comparable

    K, t, tel, seq = config.steps, cfg.train, cfg.telemetry, cfg.model.seq_len
    micro = t.micro_batch_size or t.batch_size
    accum = t.batch_size // micro
    eval_every = config.eval_every or max(1, K // 5)
    eval_batches = config.eval_batches or t.eval_batches
    every = min(config.telemetry_every or tel.every, K)
    window = min(tel.window, every)

    run = RunDir(out)
    run.create()
    out_config = {
        **resolved,
        "name": f"{resolved.get('name', Path(run_dir).name)}+plasticity",
        "train": {**resolved["train"], "steps": K},
        "plasticity": {
            "from_run": str(Path(run_dir).resolve()),
            "from_step": int(from_step),
            "data": source.spec(),
            "data_description": source.describe(),
            **asdict(config),
        },
    }
    run.write_config(out_config)
    run.write_status(RunStatus.RUNNING, 0)

    probe_batches = [x for x, _ in new.val_batches(micro, seq, config.measure_batches, device=dev)]
    if not probe_batches:
        raise ValueError("the second corpus's validation split is too small to measure on")
    before = measure_model(model, probe_batches, freq_table=freq, step=0)

    def evaluate(step: int, loss: float, lr: float, tok_s: float) -> dict:
        rec = {"step": step, "loss": loss, "lr": lr, "tokens_per_s": tok_s}
        rec["val_loss"] = _val_loss(model, new, micro, seq, eval_batches, dev)
        rec["val_loss_orig"] = _val_loss(model, orig, micro, seq, eval_batches, dev)
        return rec

    for group in opt.param_groups:
        group["lr"] = group["base_lr"] * config.lr_scale
    lr = float(opt.param_groups[0]["lr"])
    records = [evaluate(0, math.nan, lr, 0.0)]
    run.append_metrics(records[-1:])
    sink = _Collect()
    probe = attach(
        model,
        sites=tuple(tel.sites),
        freq_table=freq if tel.buckets else None,
        every=every,
        window=window,
        dtype=tel.dtype,
        total_steps=K,
        sinks=[sink],
        mode="train",
    )

    def forward_backward(it: int) -> float:
        loss_sum = 0.0
        for m in range(accum):
            x, y = new.train_batch(micro, seq, seed=t.seed, step=it, micro_step=m, device=dev)
            _, loss = model(x, y)
            (loss / accum).backward()
            loss_sum += float(loss.detach())
        return loss_sum / accum

    model.train()
    _steps(
        model,
        opt,
        probe,
        sink,
        run,
        records,
        forward_backward,
        lambda step, loss, tok_s: evaluate(step, loss, lr, tok_s),
        K=K,
        eval_every=eval_every,
        tokens_per_step=t.batch_size * seq,
        grad_clip=t.grad_clip,
        name=str(run_dir),
        say=lambda step: say(f"{out}: step {step}/{K} val_loss {records[-1]['val_loss']:.4f}"),
    )
    after = measure_model(model, probe_batches, freq_table=freq, step=K)
    pd.concat([before, after], ignore_index=True).drop(columns="eigenvalues").to_parquet(run.path / CAPACITY_FILE)

    summary: dict[str, Any] = {
        "run_id": Path(run_dir).name,
        "from_run": str(Path(run_dir).resolve()),
        "kind": "capscale",
        "steps": K,
        "label": cfg.label,
        "seed": t.seed,
        "ffn_width": cfg.model.ffn_dim,
        "optimizer": f"{cfg.optimizer.name}: the run's own, its state from the checkpoint",
        **_summary(records, before, after),
    }
    atomic_write_text(run.path / SUMMARY_FILE, json.dumps(summary, indent=1) + "\n")
    run.write_status(RunStatus.DONE, K)
    return summary


# -- Hugging Face model directories --------------------------------------------------


@dataclass(frozen=True)
class HFOptions:
    """How a Hugging Face model is continued: a directory holds weights but no optimizer state,
    so the optimizer is a fresh AdamW (``lr`` constant, ``betas``, ``weight_decay``), gradients
    clipped at ``grad_clip``. ``batch_size`` × ``seq_len`` tokens per step (``seq_len`` None:
    the model's context, at most 128); ``seed``: the order of the training windows."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    batch_size: int = 8
    seq_len: int | None = None
    seed: int = 0
    val_fraction: float = 0.1

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if self.batch_size < 1 or (self.seq_len is not None and self.seq_len < 2):
            raise ValueError(f"batch_size must be >= 1 and seq_len >= 2, got {self.batch_size}, {self.seq_len}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")

    def describe(self) -> str:
        return (
            f"AdamW, fresh state (a Hugging Face model directory holds no optimizer state): lr {self.lr:g} constant, "
            f"betas {tuple(self.betas)}, weight decay {self.weight_decay:g}, gradient clip {self.grad_clip:g}"
        )


def _token_ids(source, encode: Callable[[str], list[int]], eos_id: int | None, limit: int | None) -> np.ndarray:
    """A source's documents as one id stream (documents separated by EOS where the model has one)."""
    ids: list[int] = []
    for doc in source.documents():
        if eos_id is not None:
            ids.append(eos_id)
        ids += encode(doc)
        if limit is not None and len(ids) >= limit:
            break
    if not ids:
        raise ValueError(f"{source.describe()} yielded no tokens")
    return np.asarray(ids[:limit] if limit is not None else ids, dtype=np.int64)


def _split(ids: np.ndarray, val_fraction: float, seq: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    n_val = int(round(len(ids) * val_fraction))
    train, val = ids[: len(ids) - n_val], ids[len(ids) - n_val :]
    if len(val) < seq or len(train) < seq + 1:
        raise ValueError(f"{what}: {len(ids)} tokens are too few for windows of {seq} in both splits")
    return train, val


def _windows(ids: np.ndarray, seq: int, n: int, batch: int, device) -> list[torch.Tensor]:
    """The first ``n`` consecutive batches of ``batch`` windows of ``seq`` tokens (fixed: evaluation)."""
    rows = [ids[i : i + seq] for i in range(0, len(ids) - seq + 1, seq)][: n * batch]
    return [torch.as_tensor(np.stack(rows[i : i + batch]), device=device) for i in range(0, len(rows), batch)]


@torch.no_grad()
def _hf_loss(model, batches: list[torch.Tensor]) -> float:
    was = model.training
    model.eval()
    total = sum(float(model(input_ids=x, labels=x).loss) for x in batches)
    model.train(was)
    return total / len(batches)


def continue_hf(
    model: torch.nn.Module,
    encode: Callable[[str], list[int]],
    eos_id: int | None,
    data: str | dict,
    out: str | Path,
    config: PlasticityConfig = PlasticityConfig(),
    options: HFOptions = HFOptions(),
    *,
    model_dir: str | Path,
    context: int | None = None,
    orig_data: str | dict | None = None,
    device: str = "cpu",
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Continue a Hugging Face causal LM (``model``, its tokenizer's ``encode``; as ``capscale
    measure`` loads a model directory) on corpus ``data`` for K steps into the run directory
    ``out``, with a fresh AdamW (``options``; the directory holds no optimizer state), telemetry
    on. HEAD/MID/TAIL come from the second corpus's training split. Forgetting is measured on
    ``orig_data``'s held-out split (the last ``val_fraction`` of it) where given, else it is None:
    the directory does not say what the model was trained on."""
    say = log or (lambda _m: None)
    dev = torch.device(device)
    model = model.to(dev)
    seq = options.seq_len or min(context or 128, 128)
    if context is not None and seq > context:
        raise ValueError(f"seq_len {seq} is longer than the model's context {context}")
    source = make_source(data)
    limit = config.max_tokens
    train_ids, val_ids = _split(_token_ids(source, encode, eos_id, limit), options.val_fraction, seq, "--data")
    vocab = int(model.get_input_embeddings().num_embeddings)
    if max(int(train_ids.max()), int(val_ids.max())) >= vocab:
        raise ValueError(f"the tokenizer gives ids beyond the model's {vocab} embeddings: not this model's tokenizer")
    orig_val = None
    if orig_data is not None:
        orig_source = make_source(orig_data)
        if orig_source.fingerprint() == source.fingerprint():
            raise ValueError("--orig-data is the second corpus itself: forgetting needs the original domain")
        _, orig_ids = _split(_token_ids(orig_source, encode, eos_id, limit), options.val_fraction, seq, "--orig-data")
    eval_n = config.eval_batches or 4
    new_val = _windows(val_ids, seq, eval_n, options.batch_size, dev)
    if orig_data is not None:
        orig_val = _windows(orig_ids, seq, eval_n, options.batch_size, dev)
    probe_batches = _windows(val_ids, seq, config.measure_batches, options.batch_size, dev)
    from capscale.spectrum import FrequencyTable

    freq = FrequencyTable(np.bincount(train_ids, minlength=vocab))
    with torch.no_grad():
        first = model(input_ids=new_val[0][:1], labels=new_val[0][:1])
    if getattr(first, "loss", None) is None:
        raise ValueError(f"{model_dir}: {type(model).__name__} computes no language-model loss (no LM head)")

    K = config.steps
    eval_every = config.eval_every or max(1, K // 5)
    every = min(config.telemetry_every or max(1, K // 4), K)
    run = RunDir(out)
    run.create()
    run.write_config(
        {
            "name": f"{Path(model_dir).name}+plasticity",
            "model": {"huggingface": str(Path(model_dir).resolve()), "class": type(model).__name__},
            "train": {"steps": K, "batch_size": options.batch_size, "seq_len": seq, "seed": options.seed},
            "optimizer": {"name": "adamw", **asdict(options), "state": "fresh"},
            "plasticity": {
                "from_run": str(Path(model_dir).resolve()),
                "kind": "huggingface",
                "data": source.spec(),
                "data_description": source.describe(),
                "orig_data": make_source(orig_data).spec() if orig_data is not None else None,
                "optimizer": options.describe(),
                **asdict(config),
            },
        }
    )
    run.write_status(RunStatus.RUNNING, 0)
    before = measure_model(model, probe_batches, freq_table=freq, step=0)
    opt = torch.optim.AdamW(model.parameters(), lr=options.lr, betas=options.betas, weight_decay=options.weight_decay)

    def evaluate(step: int, loss: float, tok_s: float) -> dict:
        rec = {
            "step": step,
            "loss": loss,
            "lr": options.lr,
            "tokens_per_s": tok_s,
            "val_loss": _hf_loss(model, new_val),
        }
        rec["val_loss_orig"] = _hf_loss(model, orig_val) if orig_val is not None else None
        return rec

    records = [evaluate(0, math.nan, 0.0)]
    run.append_metrics(records[-1:])
    sink = _Collect()
    probe = attach(
        model, freq_table=freq, every=every, window=min(every, 4), dtype=torch.float64, total_steps=K, sinks=[sink]
    )
    rng = np.random.default_rng(options.seed)

    def forward_backward(_it: int) -> float:
        starts = rng.integers(0, len(train_ids) - seq, options.batch_size)
        x = torch.as_tensor(np.stack([train_ids[s : s + seq] for s in starts]), device=dev)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        return float(loss.detach())

    model.train()
    _steps(
        model,
        opt,
        probe,
        sink,
        run,
        records,
        forward_backward,
        evaluate,
        K=K,
        eval_every=eval_every,
        tokens_per_step=options.batch_size * seq,
        grad_clip=options.grad_clip,
        name=str(model_dir),
        say=lambda step: say(f"{out}: step {step}/{K} val_loss {records[-1]['val_loss']:.4f}"),
    )
    after = measure_model(model, probe_batches, freq_table=freq, step=K)
    pd.concat([before, after], ignore_index=True).drop(columns="eigenvalues").to_parquet(run.path / CAPACITY_FILE)
    cfg = model.config
    ffn = getattr(cfg, "n_inner", None) or getattr(cfg, "intermediate_size", None) or getattr(cfg, "ffn_dim", None)
    if ffn is None and getattr(cfg, "n_embd", None):
        ffn = 4 * cfg.n_embd  # GPT-2's default inner width
    summary: dict[str, Any] = {
        "run_id": Path(model_dir).name,
        "from_run": str(Path(model_dir).resolve()),
        "kind": "huggingface",
        "steps": K,
        "label": str(getattr(cfg, "model_type", "huggingface")),
        "seed": options.seed,
        "ffn_width": int(ffn) if ffn else None,
        "optimizer": options.describe(),
        **_summary(records, before, after),
    }
    atomic_write_text(run.path / SUMMARY_FILE, json.dumps(summary, indent=1) + "\n")
    run.write_status(RunStatus.DONE, K)
    return summary
