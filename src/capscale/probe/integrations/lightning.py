"""Lightning ``Callback``: attach at train start, step with the trainer, log through ``trainer.loggers``.

    trainer = L.Trainer(max_steps=..., logger=TensorBoardLogger(...),
                        callbacks=[CapscaleLightningCallback(every=200, freq_table=table)])

The probe is attached to the LightningModule, whose ``forward`` is the root
that supplies token ids; if ``training_step`` does not call ``self(...)``,
pass ``root="model"`` (the submodule that is called) or ``token_ids=fn``
(batch → ids).
"""

from __future__ import annotations

from collections.abc import Callable

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the standalone package
    from pytorch_lightning.callbacks import Callback

from capscale.probe.probe import Probe, attach
from capscale.probe.sinks import ScalarBuffer


class CapscaleLightningCallback(Callback):
    """Runs a :class:`~capscale.probe.Probe` during ``Trainer.fit``; kwargs go to ``attach``."""

    def __init__(self, *, sinks=(), token_ids: Callable | None = None, **attach_kwargs):
        self.sinks = list(sinks)
        self.token_ids = token_ids
        self.attach_kwargs = attach_kwargs
        self.probe: Probe | None = None
        self._buffer = ScalarBuffer()

    def on_train_start(self, trainer, pl_module):
        kw = dict(self.attach_kwargs)
        if "total_steps" not in kw:
            total = (
                trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else trainer.estimated_stepping_batches
            )
            kw["total_steps"] = int(total) if total != float("inf") else None
        kw.setdefault("start_step", trainer.global_step)
        self.probe = attach(pl_module, sinks=[*self.sinks, self._buffer], **kw)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.probe.step(trainer.global_step)
        if self.token_ids is not None:
            self.probe.batch(token_ids=self.token_ids(batch))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.probe.step(trainer.global_step)
        self._log(trainer)

    def on_train_end(self, trainer, pl_module):
        if self.probe is not None:
            self.probe.close()
            self._log(trainer)

    def _log(self, trainer) -> None:
        items = self._buffer.pop()
        if not trainer.is_global_zero:
            return
        for step, scalars in items:
            for logger in trainer.loggers:
                logger.log_metrics(scalars, step=step)
