"""Hugging Face ``Trainer`` integration: one callback line per run.

    trainer = Trainer(model=model, args=TrainingArguments(..., report_to=["tensorboard"]), ...,
                      callbacks=[capscale.HFCallback(every=50, out="runs/adamw_w1024",
                                                     run_config={"optimizer": "adamw", "seed": 0})])
    trainer.train()

The probe attaches at train start and steps with the trainer. Measurements go
straight to the trainer's TensorBoard writer and W&B run at the *measured* step
(``report_to``), whatever the callback order; the trainer's loss and eval loss
go into the run directory's ``metrics.jsonl`` (the eval loss read from the key
``val_loss_key=``, default ``eval_loss``; a run that logs none is warned about once).
After ``train()``, ``cb.probe.compute()`` returns the spectra and the run directory is
complete.

Given a frequency table (``freq_table=``), each evaluation also computes the validation
loss per HEAD/MID/TAIL bucket of the target token (``val_loss_head/mid/tail``): one
extra no-grad pass over the trainer's eval dataloader (labels as the model reads them,
next-token, ``-100`` ignored). An exception raised by a training step, an evaluation or
a save marks the run directory ``failed``; ``HFCallback.add_to(trainer)`` covers the
whole of ``trainer.train()``. A window with N/D below 10 is warned about once, with the
``window=`` that fixes it.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import CallbackHandler

from capscale.probe.integrations._common import BucketLoss, SampleCheck, warn_no_val_loss
from capscale.probe.probe import Probe, attach
from capscale.probe.runwriter import check_run_config
from capscale.probe.sinks import Sink, TensorBoardSink, WandbSink

# Trainer log keys → run metrics (docs/run-format.md)
_METRICS = {"loss": "loss", "eval_loss": "val_loss", "learning_rate": "lr"}


class HFCallback(TrainerCallback):
    """Runs a :class:`~capscale.probe.Probe` inside ``Trainer.train``; ``out``, ``run_config`` and kwargs go to ``attach``.

    ``total_steps`` (the last step is always measured) and ``start_step``
    default to the trainer's ``max_steps`` and ``global_step``; ``run_config``'s
    ``steps`` to ``max_steps``.
    """

    def __init__(self, *, out=None, run_config=None, sinks=(), val_loss_key: str = "eval_loss", **attach_kwargs):
        self.out, self.run_config = out, run_config
        self.val_loss_key = val_loss_key
        self._metrics = {**{k: v for k, v in _METRICS.items() if v != "val_loss"}, val_loss_key: "val_loss"}
        self._val_logged = False
        check_run_config(out, run_config)
        self.sinks = list(sinks)
        self.attach_kwargs = attach_kwargs
        self.probe: Probe | None = None
        self._handler: CallbackHandler | None = None

    @classmethod
    def add_to(cls, trainer, **kwargs) -> HFCallback:
        """Create one and add it to ``trainer`` (the same as passing it in ``callbacks=[...]``)."""
        cb = cls(**kwargs)
        trainer.add_callback(cb)
        _mark_failures(trainer, "train", cb)  # any exception of train(): the run ends failed
        return cb

    def _fail(self, exc: BaseException) -> None:
        if self.probe is not None:  # close is idempotent: a second failure changes nothing
            self.probe.__exit__(type(exc), exc, exc.__traceback__)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        kw = dict(self.attach_kwargs)
        max_steps = state.max_steps if state.max_steps and state.max_steps > 0 else None
        kw.setdefault("total_steps", max_steps)
        kw.setdefault("start_step", state.global_step)
        run_config = self.run_config
        if self.out is not None and run_config is not None and max_steps and "steps" not in run_config:
            run_config = {**run_config, "steps": max_steps}
        self._handler = _calling(CallbackHandler)
        sinks = [*self.sinks, SampleCheck(kw.get("window", 1))]
        if state.is_world_process_zero:
            sinks.append(_TrainerLoggers(self, args))
        self.probe = attach(model, sinks=sinks, out=self.out, run_config=run_config, **kw)
        table = self.probe.freq_table
        self._buckets = BucketLoss(table) if table is not None and self.out is not None else None
        self._val_logged = False
        trainer = _calling(Trainer)
        if trainer is not None:
            for name in ("training_step", "_maybe_log_save_evaluate"):
                _mark_failures(trainer, name, self)

    def on_step_begin(self, args, state, control, **kwargs):
        self.probe.step(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self.probe.step(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.probe is None or self.out is None or not logs:
            return
        metrics = {self._metrics[k]: v for k, v in logs.items() if k in self._metrics and isinstance(v, (int, float))}
        if metrics:
            self._val_logged = self._val_logged or "val_loss" in metrics
            self.probe.log(state.global_step, **metrics)

    def on_evaluate(self, args, state, control, model=None, eval_dataloader=None, **kwargs):
        if self._buckets is None or model is None or eval_dataloader is None:
            return
        import torch

        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        try:
            with torch.no_grad():
                for batch in eval_dataloader:
                    batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
                    labels = batch.get("labels", batch.get("input_ids"))
                    self._buckets.add_causal(model(**batch).logits, labels)
        finally:
            model.train(was_training)
        self.probe.log(state.global_step, **self._buckets.result())
        self._buckets.reset()

    def on_train_end(self, args, state, control, **kwargs):
        if self.out is not None and not self._val_logged:
            warn_no_val_loss("HFCallback", [self.val_loss_key])
        if self.probe is not None:
            self.probe.close()

    def _callback(self, name: str):
        handler = self._handler
        for cb in handler.callbacks if handler is not None else ():
            if type(cb).__name__ == name:
                return cb
        return None


class _TrainerLoggers(Sink):
    """The trainer's own TensorBoard writer and W&B run, found when a measurement is ready."""

    def __init__(self, cb: HFCallback, args):
        self.cb, self.args = cb, args
        report_to = args.report_to if isinstance(args.report_to, (list, tuple)) else [args.report_to]
        self.report_to = {str(r) for r in report_to or ()}
        self._tb: TensorBoardSink | None = None
        self._tb_writer = None
        self._wandb: WandbSink | None = None

    def _sinks(self) -> list[Sink]:
        out = []
        if "tensorboard" in self.report_to or "all" in self.report_to:
            hf_tb = self.cb._callback("TensorBoardCallback")
            writer = getattr(hf_tb, "tb_writer", None)
            if writer is None and self._tb is None:  # no trainer writer to share: our own, where HF's would be
                log_dir = os.getenv("TENSORBOARD_LOGGING_DIR") or str(Path(self.args.output_dir) / "runs" / "capscale")
                self._tb = TensorBoardSink(log_dir)
            elif writer is not None and writer is not self._tb_writer:
                self._tb, self._tb_writer = TensorBoardSink(writer=writer), writer
            out.append(self._tb)
        if "wandb" in self.report_to or "all" in self.report_to:
            import wandb

            if wandb.run is not None:
                if self._wandb is None or self._wandb.run is not wandb.run:
                    self._wandb = WandbSink(run=wandb.run)
                out.append(self._wandb)
        return out

    def write_spectra(self, frame) -> None:
        for sink in self._sinks():
            sink.write_spectra(frame)

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        for sink in self._sinks():
            sink.write_scalars(step, scalars)

    def close(self) -> None:
        for sink in (self._tb, self._wandb):
            if sink is not None:
                sink.close()


def _mark_failures(trainer, name: str, cb: HFCallback) -> None:
    """Wrap ``trainer.<name>`` so that an exception it raises marks the run failed, then propagates."""
    method = getattr(trainer, name, None)
    if method is None or getattr(method, "_capscale_marks", None) is cb:
        return

    def wrapped(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except BaseException as exc:
            cb._fail(exc)
            raise

    wrapped._capscale_marks = cb
    setattr(trainer, name, wrapped)


def _calling(cls):
    """The nearest caller's ``self`` that is a ``cls`` (callbacks get no reference to their
    trainer, nor to its other callbacks: the trainer and the handler calling us hold both)."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            obj = frame.f_locals.get("self")
            if isinstance(obj, cls):
                return obj
            frame = frame.f_back
        return None
    finally:
        del frame


CapscaleCallback = HFCallback  # the earlier name
