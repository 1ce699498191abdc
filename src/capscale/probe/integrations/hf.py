"""Hugging Face ``Trainer`` integration: attach at train start, step with the trainer,
log through its own reporting integrations (TensorBoard, W&B, …).

    trainer = Trainer(model=model, args=TrainingArguments(..., report_to=["tensorboard"]), ...)
    CapscaleCallback.add_to(trainer, every=200, freq_table=table, sinks=[ParquetSink(run / "spectra.parquet")])
    trainer.train()

Scalar summaries reach the trainer's loggers by being added to the ``logs``
of the next ``on_log`` event (the callback asks for one at the end of every
measured window). The reporting callbacks must see those logs after we have
added to them, so ``add_to`` puts this callback first; passed through
``Trainer(callbacks=[...])`` it comes after them and only its own sinks get
the records.
"""

from __future__ import annotations

from transformers import TrainerCallback

from capscale.probe.probe import Probe, attach
from capscale.probe.sinks import ScalarBuffer


class CapscaleCallback(TrainerCallback):
    """Runs a :class:`~capscale.probe.Probe` inside ``Trainer.train``; kwargs go to ``attach``.

    ``total_steps`` (the last step is always measured) and ``start_step``
    default to the trainer's ``max_steps`` and ``global_step``.
    """

    def __init__(self, *, sinks=(), **attach_kwargs):
        self.sinks = list(sinks)
        self.attach_kwargs = attach_kwargs
        self.probe: Probe | None = None
        self._buffer = ScalarBuffer()
        self._pending: dict[str, float] = {}

    @classmethod
    def add_to(cls, trainer, **kwargs) -> CapscaleCallback:
        """Create one and register it ahead of the trainer's reporting callbacks."""
        cb = cls(**kwargs)
        trainer.callback_handler.callbacks.insert(0, cb)
        return cb

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        kw = dict(self.attach_kwargs)
        kw.setdefault("total_steps", state.max_steps if state.max_steps and state.max_steps > 0 else None)
        kw.setdefault("start_step", state.global_step)
        self.probe = attach(model, sinks=[*self.sinks, self._buffer], **kw)

    def on_step_begin(self, args, state, control, **kwargs):
        self.probe.step(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self.probe.step(state.global_step)
        self._collect(control)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending and logs is not None:
            logs.update(self._pending)
            self._pending = {}

    def on_train_end(self, args, state, control, **kwargs):
        if self.probe is not None:
            self.probe.close()
            self._collect(control)

    def _collect(self, control) -> None:
        for _, scalars in self._buffer.pop():
            self._pending.update(scalars)
        if self._pending:
            control.should_log = True
