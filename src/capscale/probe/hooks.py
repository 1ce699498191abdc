"""The probe's hooks: a root hook that delimits one forward and reads its token ids and
padding mask, and a hook per FFN site that hands its activations to the probe.

The Probe decides what a forward and an activation mean (probe/probe.py); this module
installs and removes the hooks, and reads the forward's inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from capscale.probe.accumulate import Forward
from capscale.probe.sites import DispatchedRows, Site


class Hooks:
    """The registered hook handles of one probe (none while no window is open, by default)."""

    def __init__(self) -> None:
        self._handles: list = []

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    def install(
        self,
        root: nn.Module,
        sites: list[Site],
        on_root_pre: Callable,
        on_root_post: Callable,
        on_site: Callable,
        persistent: bool,
    ) -> None:
        """``on_root_pre(module, args, kwargs)`` and ``on_root_post`` around each root forward,
        ``on_site(i, x, rows)`` for site ``i``. Persistent hooks (under ``torch.compile``) run
        eagerly: dynamo does not guard on hook dicts, so they exist before compilation."""
        wrap = torch.compiler.disable if persistent else (lambda f: f)
        h = self._handles
        h.append(root.register_forward_pre_hook(wrap(on_root_pre), with_kwargs=True))
        h.append(root.register_forward_hook(wrap(on_root_post), always_call=True))
        for i, site in enumerate(sites):
            h += site.register(lambda x, rows, i=i: on_site(i, x, rows), wrap)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def routed(fwd: Forward, rows, label: str = "") -> Forward:
    """The forward's mask and buckets for activation rows taken from token positions ``rows``
    (a ``sites.RoutedRows``: positions in a block input of ``n`` rows, which must be the tokens),
    or sent here by expert parallelism (a ``sites.DispatchedRows``: the labels follow the tokens)."""
    tokens = next((int(t.numel()) for t in (fwd.bucket_ids, fwd.mask) if t is not None), None)
    if isinstance(rows, DispatchedRows):
        if tokens is not None and rows.n != tokens:
            raise ValueError(f"{label}: its experts were fed {rows.n} tokens but the forward has {tokens}")
        labels = [t.reshape(-1).long() for t in (fwd.mask, fwd.bucket_ids) if t is not None]
        if not labels:  # nothing to follow: no collective (every rank of the group alike)
            return Forward(None, None, None, fwd.capture)
        got = iter(rows.route(torch.stack(labels, 1)).unbind(1))
        mask = None if fwd.mask is None else next(got) != 0
        buckets = None if fwd.bucket_ids is None else next(got).to(fwd.bucket_ids.dtype)
        return Forward(None, mask, buckets, fwd.capture)
    positions, n = rows
    if tokens is not None and n != tokens:
        raise ValueError(
            f"{label}: its experts read rows of a {n}-row input but the forward has {tokens} tokens: the "
            "MoE module whose input the probe matches is not fed the tokens (they were dispatched or "
            "permuted before it, as Megatron's SequentialMLP is fed them), so no row can be given its "
            "token's bucket or mask; name the sites of a module fed the hidden states, or measure "
            "without buckets and mask"
        )
    mask = None if fwd.mask is None else fwd.mask.reshape(-1)[positions.to(fwd.mask.device)]
    buckets = None
    if fwd.bucket_ids is not None:
        buckets = fwd.bucket_ids.reshape(-1)[positions.to(fwd.bucket_ids.device)]
    return Forward(None, mask, buckets, fwd.capture)


def ids_and_mask(args, kwargs):
    ids = kwargs.get("input_ids")
    if ids is None and args:
        ids = args[0]
    if not torch.is_tensor(ids) or ids.is_floating_point() or ids.dtype == torch.bool:
        return None, None
    mask = kwargs.get("attention_mask")
    # Only a [batch, seq] padding mask is a row mask; 4-D attention masks are not.
    if torch.is_tensor(mask) and tuple(mask.shape) == tuple(ids.shape):
        return ids, mask != 0
    return ids, None


def is_compiled(model: nn.Module) -> bool:
    return hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule"
