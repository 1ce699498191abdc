"""Lightning ``Callback``: attach at train start, step with the trainer, log through ``trainer.loggers``.

    trainer = L.Trainer(max_steps=..., logger=TensorBoardLogger(...),
                        callbacks=[capscale.LightningCallback(every=200, out="runs/muon_w512",
                                                              run_config={"optimizer": "muon"})])

The probe finds the model inside the LightningModule by itself: when one child
module (e.g. ``self.model``) holds every FFN site, that child is the root whose
forward supplies the token ids, so ``training_step`` may call ``self(...)`` or
``self.model(...)``. Pass ``root=`` (a submodule name) or ``token_ids=fn``
(batch → ids) to choose otherwise. Measurements reach every logger at the
measured step (TensorBoard and W&B with histograms); the training loss (the
``training_step`` output) and the validation loss (as logged by ``self.log``, under
``val_loss_key=``; by default the first of ``val_loss``, ``val/loss``,
``validation_loss``, ``valid_loss``) go into the run directory. When no validation
loss is found, the callback warns once, naming the keys it saw.

Given a frequency table (``freq_table=``), the callback also computes the validation
loss per HEAD/MID/TAIL bucket of the target token (``val_loss_head/mid/tail``): for each
validation batch it runs one extra no-grad forward of the module on the batch's token
ids (``token_ids=`` or the batch's first tensor / ``input_ids``) and takes the
next-token cross-entropy of the logits. A window with N/D below 10 is warned about
once, with the ``window=`` that fixes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the standalone package
    from pytorch_lightning.callbacks import Callback

from capscale.probe.integrations._common import BucketLoss, SampleCheck, warn_no_val_loss
from capscale.probe.probe import Probe, attach
from capscale.probe.runwriter import check_run_config
from capscale.probe.sinks import Sink, TensorBoardSink, WandbSink
from capscale.probe.sites import SITE_NAMES, SiteDiscoveryError, discover_sites

_VAL_KEYS = ("val_loss", "val/loss", "validation_loss", "valid_loss")


class LightningCallback(Callback):
    """Runs a :class:`~capscale.probe.Probe` during ``Trainer.fit``; ``out``, ``run_config`` and kwargs go to ``attach``."""

    def __init__(
        self,
        *,
        out=None,
        run_config=None,
        sinks=(),
        token_ids: Callable | None = None,
        val_loss_key: str | tuple[str, ...] | None = None,
        **attach_kwargs,
    ):
        self.out, self.run_config = out, run_config
        self.val_keys = (val_loss_key,) if isinstance(val_loss_key, str) else tuple(val_loss_key or _VAL_KEYS)
        check_run_config(out, run_config)
        self.sinks = list(sinks)
        self.token_ids = token_ids
        self.attach_kwargs = attach_kwargs
        self.probe: Probe | None = None

    def on_train_start(self, trainer, pl_module):
        kw = dict(self.attach_kwargs)
        if "total_steps" not in kw:
            total = (
                trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else trainer.estimated_stepping_batches
            )
            kw["total_steps"] = int(total) if total != float("inf") else None
        kw.setdefault("start_step", trainer.global_step)
        if "root" not in kw:
            kw["root"] = model_root(pl_module, kw.get("sites", SITE_NAMES), kw.get("layers", "auto"))
        run_config = self.run_config
        if self.out is not None and run_config is not None and kw["total_steps"] and "steps" not in run_config:
            run_config = {**run_config, "steps": kw["total_steps"]}
        sinks = [*self.sinks, SampleCheck(kw.get("window", 1))]
        if trainer.is_global_zero:
            sinks += [_logger_sink(logger) for logger in trainer.loggers]
        self.probe = attach(pl_module, sinks=sinks, out=self.out, run_config=run_config, **kw)
        self._step, self._losses = trainer.global_step, []
        self._val_logged, self._val_warned = False, False
        table = self.probe.freq_table
        self._buckets = BucketLoss(table) if table is not None and self.out is not None else None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.probe.step(trainer.global_step)
        if self.token_ids is not None:
            self.probe.batch(token_ids=self.token_ids(batch))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        self.probe.step(trainer.global_step)
        if self.out is None:
            return
        if loss is not None:
            self._losses.append(float(loss.detach()) if hasattr(loss, "detach") else float(loss))
        if trainer.global_step != self._step and self._losses:  # an optimizer step ended: its micro-batches' mean
            self.probe.log(trainer.global_step, loss=sum(self._losses) / len(self._losses))
            self._losses = []
        self._step = trainer.global_step

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self._buckets is None or trainer.sanity_checking:
            return
        try:
            ids = self.token_ids(batch) if self.token_ids is not None else _batch_ids(batch)
            out = pl_module(ids)
            logits = getattr(out, "logits", out[0] if isinstance(out, (tuple, list)) else out)
            self._buckets.add_causal(logits, ids)
        except Exception as exc:  # a module whose forward is not ids → logits: say so once, go on without
            import warnings

            warnings.warn(
                f"capscale LightningCallback: per-bucket validation loss is off ({type(exc).__name__}: {exc}); "
                "pass token_ids= (batch → ids) for a module whose forward maps ids to logits",
                stacklevel=2,
            )
            self._buckets = None

    def on_validation_end(self, trainer, pl_module):
        if self.probe is None or self.out is None or trainer.sanity_checking:
            return
        metrics = {}
        for key in self.val_keys:
            value = trainer.callback_metrics.get(key)
            if value is not None and math.isfinite(float(value)):
                metrics["val_loss"] = float(value)
                break
        if self._buckets is not None and self._buckets.counts[0] > 0:
            metrics.update(self._buckets.result())
            self._buckets.reset()
        if "val_loss" in metrics:
            self._val_logged = True
        elif not self._val_warned:
            self._val_warned = True
            warn_no_val_loss("LightningCallback", self.val_keys, trainer.callback_metrics)
        if metrics:
            self.probe.log(trainer.global_step, **metrics)

    def on_train_end(self, trainer, pl_module):
        if self.out is not None and not self._val_logged and not self._val_warned:
            self._val_warned = True
            warn_no_val_loss("LightningCallback", self.val_keys)
        if self.probe is not None:
            self.probe.close()

    def on_exception(self, trainer, pl_module, exception):
        if self.probe is not None:  # the open window is incomplete: dropped; the run is marked failed
            self.probe.__exit__(type(exception), exception, exception.__traceback__)


def _batch_ids(batch):
    if isinstance(batch, dict):
        return batch["input_ids"]
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


def model_root(module, sites=SITE_NAMES, layers="auto") -> str | None:
    """The name of the one child of ``module`` that holds every FFN site, else None (``module`` itself)."""
    try:
        found = discover_sites(module, sites, layers)
    except (SiteDiscoveryError, ValueError, TypeError):
        return None  # attach reports the problem itself
    heads = {s.name.split(".", 1)[0] if "." in s.name else None for s in found}
    if len(heads) == 1 and None not in heads:
        (head,) = heads
        if head in dict(module.named_children()):
            return head
    return None


class _LoggerSink(Sink):
    """Any Lightning logger: the dashboard scalars through ``log_metrics`` at the measured step."""

    def __init__(self, logger):
        self.logger = logger

    def write_spectra(self, frame) -> None:
        if frame.empty:
            return
        from capscale.probe.dashboard import dashboard_scalars, frame_step

        self.logger.log_metrics(dashboard_scalars(frame), step=frame_step(frame))

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        from capscale.probe.dashboard import is_monitor_key

        data = {k: v for k, v in scalars.items() if is_monitor_key(k)}
        if data:
            self.logger.log_metrics(data, step=step)


def _logger_sink(logger) -> Sink:
    kind = type(logger).__name__
    if kind == "TensorBoardLogger":  # histograms as well
        return TensorBoardSink(writer=logger.experiment)
    if kind == "WandbLogger":
        return WandbSink(run=logger.experiment)
    return _LoggerSink(logger)


CapscaleLightningCallback = LightningCallback  # the earlier name
