"""What the HF and Lightning callbacks share: per-bucket validation loss, and warnings that name their fix.

- ``BucketLoss``: validation loss per HEAD/MID/TAIL bucket of the *target* token (the
  harness's rule, ``train.loop.evaluate``), accumulated in float64 over the validation
  batches from the model's logits and the targets (next-token: position t predicts t + 1).
- ``SampleCheck``: a sink that warns once when a window's N/D is below the well-sampled
  threshold, naming the fix: ``window=`` and the tokens per window it needs.
- ``warn_no_val_loss``: one warning when a run logged no validation loss under the keys read.
"""

from __future__ import annotations

import math
import warnings

import torch

from capscale.probe.sinks import Sink
from capscale.spectrum.summary import WELL_SAMPLED

NO_VAL_LOSS = (
    "the report's matched-loss and per-regime answers will say 'not measured'. "
    "Pass val_loss_key='<the key your loop logs>' to read it"
)


class NoValidationLossWarning(UserWarning):
    """A callback's run directory will hold no validation loss."""


class LowSamplesWarning(UserWarning):
    """A measured window holds fewer than ``WELL_SAMPLED`` samples per dimension."""


def warn_no_val_loss(who: str, keys, seen=()) -> None:
    logged = f" (logged: {', '.join(sorted(seen)[:12])})" if seen else ""
    warnings.warn(
        f"capscale {who}: no validation loss was logged under {list(keys)}{logged}; {NO_VAL_LOSS}.",
        NoValidationLossWarning,
        stacklevel=3,
    )


class BucketLoss:
    """Validation cross-entropy per bucket of the target token: sums and counts over batches."""

    def __init__(self, freq_table):
        self.freq_table = freq_table
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(4, dtype=torch.float64)  # all, head, mid, tail
        self.counts = torch.zeros(4, dtype=torch.float64)

    @torch.no_grad()
    def add(self, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> None:
        """``logits`` [B, S, V] predicting ``targets`` [B, S] position for position (already shifted)."""
        logits = logits.reshape(-1, logits.shape[-1]).double().cpu()
        targets = targets.reshape(-1).cpu().long()
        keep = targets != ignore_index
        tok = torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="none")
        b = torch.as_tensor(self.freq_table.bucket(targets[keep].numpy())).long()
        self.sums[0] += tok.sum()
        self.counts[0] += tok.numel()
        self.sums[1:] += torch.zeros(3, dtype=torch.float64).index_add_(0, b, tok)
        self.counts[1:] += torch.bincount(b, minlength=3).double()

    def add_causal(self, logits: torch.Tensor, ids: torch.Tensor, ignore_index: int = -100) -> None:
        """Next-token prediction: position t of ``logits`` predicts ``ids`` at t + 1."""
        self.add(logits[:, :-1], ids[:, 1:], ignore_index)

    def result(self) -> dict[str, float]:
        mean = (self.sums / self.counts.clamp(min=1)).tolist()
        out = {}
        for i, name in enumerate(("head", "mid", "tail"), start=1):
            out[f"val_loss_{name}"] = mean[i] if self.counts[i] > 0 else math.nan
        return out


class SampleCheck(Sink):
    """Warns once when a window's samples per dimension (N/D) fall below the well-sampled threshold."""

    def __init__(self, window: int):
        self.window = window
        self.warned = False

    def write_spectra(self, frame) -> None:
        if self.warned or frame.empty or "samples_per_dim" not in frame.columns:
            return
        nd = frame["samples_per_dim"].astype(float)
        if not (nd < WELL_SAMPLED).any():
            return
        worst = frame.loc[nd.idxmin()]
        factor = math.ceil(WELL_SAMPLED / max(float(worst["samples_per_dim"]), 1e-9))
        tokens = frame.loc[frame["bucket"] == "all", "n_samples"].max() if "bucket" in frame.columns else math.nan
        need = (
            f"; about {int(factor * tokens):,} tokens per window (now {int(tokens):,})"
            if tokens == tokens and tokens > 0
            else ""
        )
        self.warned = True
        warnings.warn(
            f"capscale: a window of {self.window} step(s) gives N/D = {float(worst['samples_per_dim']):.2g} "
            f"(width {int(worst['dim'])}, {worst.get('bucket', 'all')} tokens), below {WELL_SAMPLED:g}: its ranks are "
            f"flagged. The fix: window={self.window * factor} (≥ {WELL_SAMPLED:g}·D samples per bucket{need}).",
            LowSamplesWarning,
            stacklevel=2,
        )
