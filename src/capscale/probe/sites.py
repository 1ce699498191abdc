"""Site hooks: one resolved FFN site of a model and how its activations are captured.

A *site* is one tensor per transformer block: ``pre`` (the FFN pre-activation:
the output of the up projection, or of the gate projection in a gated FFN) or
``post`` (the post-activation: the input of the down projection). A
:class:`Site` installs the forward hook that hands that tensor to the probe;
fused MoE experts are recomputed from their inputs and weights for the tokens
each expert was routed, and expert modules are mapped back to their tokens.

Finding the sites of a model is :mod:`capscale.probe.discovery`; its public
names (``discover``, ``discover_sites``, ``Discovery``, ``Skipped``,
``Architecture``, ``ARCHITECTURES``) are importable from here too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

SITE_NAMES = ("pre", "post")
CAPTURES = ("output", "input")
# Which tensor of a named module is the site when the user names only the module.
DEFAULT_CAPTURE = {"pre": "output", "post": "input"}
SHARED_EXPERT = "shared-expert"


class SiteDiscoveryError(ValueError):
    """The FFN sites of a model could not be found, or were named ambiguously."""


class NoFFNError(SiteDiscoveryError):
    """The model has no feed-forward block to measure (e.g. a Mamba-style state-space model)."""


@dataclass(frozen=True)
class SiteSpec:
    """An explicit site: a name pattern with ``{layer}`` or module objects, and the tensor to take.

    ``modules``: ``"blocks.{layer}.ffn.fc1"`` (``{layer}`` matches the layer
    index; wrapper prefixes such as ``module.`` are allowed), a sequence of
    modules (position = layer) or a ``{layer: module}`` mapping.
    ``capture``: ``"output"`` (the module's output) or ``"input"`` (its first
    positional input).
    """

    modules: Any
    capture: str

    def __post_init__(self):
        if self.capture not in CAPTURES:
            raise ValueError(f"capture must be one of {CAPTURES}, got {self.capture!r}")


# A fused gate_up projection lays out its gate channels in one of three ways (which one is
# traced at discovery): the first half (Phi-3, Megatron), the second, or every other channel.
FUSED_GATE_LAYOUTS = ("first", "second", "interleaved")


def gate_channels(layout: str, width: int) -> tuple[int, int, int]:
    """``(start, stop, step)`` of the gate's channels in a fused gate_up output ``width`` wide."""
    half = width // 2
    return {"first": (0, half, 1), "second": (half, width, 1), "interleaved": (0, width, 2)}[layout]


def gate_layout(part: tuple[int, int, int]) -> str:
    """The layout (:data:`FUSED_GATE_LAYOUTS`) of a gate ``part`` made by :func:`gate_channels`."""
    return "interleaved" if part[2] == 2 else "first" if part[0] == 0 else "second"


class RoutedRows(NamedTuple):
    """Where an expert site's activation rows come from: ``positions`` in its MoE block's input,
    which has ``n`` rows (the forward's tokens, where the block reads hidden states)."""

    positions: torch.Tensor
    n: int


class DispatchedRows(NamedTuple):
    """Expert rows sent here by every rank of an expert-parallel group (torchtitan's all-to-all).

    ``route(labels)``: this rank's per-token labels ``[n, c]`` (its ``n`` tokens) to the labels
    of the rows here, in their order; a collective over the group, so every rank calls it."""

    route: Callable[[torch.Tensor], torch.Tensor]
    n: int


# A site's hook hands (activations, token rows) to the probe; rows = None means
# the activations' rows are the forward's tokens in order.
Callback = Callable[[Any, "RoutedRows | DispatchedRows | None"], None]


@dataclass(frozen=True, eq=False)
class Site:
    """One resolved site: stack, layer, site name, the module and which of its tensors is captured.

    ``part``: ``(start, stop, step)`` channels of the captured tensor (the gate
    half of a fused ``gate_up`` projection); ``experts``: the module is a fused
    MoE experts module and the site is recomputed from its inputs and weights
    for the tokens each expert was routed. ``call``: ``(k, n)``: the module runs
    ``n`` times per forward (one layer applied at several depths, ALBERT) and this
    site is its ``k``-th application. A channels-first convolution with kernel 1
    (SqueezeBERT's ``Conv1d``) is read over its channel axis.
    """

    layer: int
    site: str
    name: str
    module: nn.Module
    capture: str
    stack: str = ""
    part: tuple[int, int, int] | None = None
    experts: bool = False
    # Routed expert modules pooled into this site: ``module`` is the MoE block whose input holds
    # the tokens; each member is (expert, its up projection, its down projection).
    members: tuple = ()
    call: tuple[int, int] | None = None

    @property
    def label(self) -> str:
        where = f"stack {self.stack!r} " if self.stack else ""
        return f"{where}layer {self.layer} site {self.site!r} ({self.name} {self.capture})"

    def feature_dim(self) -> int | None:
        """The site's width from the module's shape where it is knowable without a forward."""
        if self.part is not None:
            return len(range(*self.part))
        if self.experts:
            return _experts_layout(self.module)[1]
        if self.members:
            _, up, down = self.members[0]
            return _in_out(up)[1] if self.site == "pre" else _in_out(down)[0]
        dims = _in_out(self.module)
        if dims is None:
            return None
        return dims[1] if self.capture == "output" else dims[0]

    def register(self, callback: Callback, wrap: Callable = lambda f: f) -> list:
        """Install the hook that feeds this site's activations to ``callback``; returns the handles."""
        if self.experts and titan_ep(self.module) is not None:
            return self._titan_ep_hooks(callback, wrap)
        if self.experts:
            return [self.module.register_forward_pre_hook(wrap(self._experts_hook(callback)), with_kwargs=True)]
        if self.members:
            return self._routed_modules_hooks(callback, wrap)
        if self.call is not None:
            callback = _nth_call(callback, *self.call)
        features = self._features()
        if self.capture == "input":

            def pre_hook(module, args):
                callback(features(args[0]) if args else None, None)

            return [self.module.register_forward_pre_hook(wrap(pre_hook))]
        part = None if self.part is None else slice(*self.part)

        def hook(module, args, output):
            x = features(output[0] if isinstance(output, (tuple, list)) else output)
            callback(x if part is None or not torch.is_tensor(x) else x[..., part], None)

        return [self.module.register_forward_hook(wrap(hook))]

    def _features(self) -> Callable:
        """A reader that puts the captured tensor's feature axis last; it refuses a tensor whose width is on no axis."""
        dims = _in_out(self.module)
        if dims is None or not _channels_first(self.module):
            # No weight to read the width from (a hook point), or a linear, which computes on the
            # last axis whatever its width there (under tensor parallelism, the rank's column
            # shard: probe/tensor_parallel.py): the last axis.
            return lambda x: x
        d = dims[1] if self.capture == "output" else dims[0]
        label, kind = self.label, type(self.module).__name__

        def read(x):
            if not torch.is_tensor(x):
                return x
            axis = 0 if x.dim() == 2 else 1  # Conv1d: [C, T] unbatched or [B, C, T]; Conv2d: [B, C, H, W]
            if x.shape[axis] == d:
                return x.movedim(axis, -1)
            raise ValueError(
                f"{label}: cannot tell the feature axis of a {tuple(x.shape)} tensor: {kind} has width {d} "
                "on its channel axis (1)"
            )

        return read

    def _routed_modules_hooks(self, callback: Callback, wrap: Callable) -> list:
        """Hooks for expert modules: each expert's input rows are found among the MoE block's input rows.

        A row's key is an integer hash of its bits, so an expert's rows (copies of the block's
        rows, ``hidden[token_idx]``) map back to token positions exactly, whatever their order.
        """
        state: dict[str, Any] = {}
        label, part = self.label, None if self.part is None else slice(*self.part)

        def on_block(module, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states")
            state.clear()
            if torch.is_tensor(x):
                keys = _row_keys(x.reshape(-1, x.shape[-1]))
                state["keys"], state["order"] = torch.sort(keys)
                state["n"] = int(keys.numel())

        def on_expert(k):
            def hook(module, args):
                x = args[0] if args else None
                if "keys" not in state or not torch.is_tensor(x):
                    state[k] = None
                    return
                keys = _row_keys(x.reshape(-1, x.shape[-1]))
                pos = torch.searchsorted(state["keys"], keys).clamp_(max=state["keys"].numel() - 1)
                if not bool((state["keys"][pos] == keys).all()):
                    raise ValueError(
                        f"{label}: an expert's input rows are not rows of the MoE block's input: the experts "
                        "are fed other rows (other ranks' tokens, as expert parallelism by all-to-all "
                        "dispatch feeds them, or rows transformed after the block's input); those experts "
                        "cannot be measured here: leave them out (sites=...) or measure without that parallelism"
                    )
                state[k] = state["order"][pos]

            return hook

        def on_up(k):
            def hook(module, args, output):
                if state.get(k) is not None:
                    callback(output if part is None else output[..., part], RoutedRows(state[k], state["n"]))

            return hook

        def on_down(k):
            def hook(module, args):
                if state.get(k) is not None:
                    callback(args[0], RoutedRows(state[k], state["n"]))

            return hook

        handles = [self.module.register_forward_pre_hook(wrap(on_block), with_kwargs=True)]
        for k, (expert, up, down) in enumerate(self.members):
            handles.append(expert.register_forward_pre_hook(wrap(on_expert(k))))
            if self.site == "pre":
                handles.append(up.register_forward_hook(wrap(on_up(k))))
            else:
                handles.append(down.register_forward_pre_hook(wrap(on_down(k))))
        return handles

    def _experts_hook(self, callback: Callback):
        m, want_pre = self.module, self.site == "pre"
        n_experts, titan = _n_experts(m), _titan_weights(m) is not None

        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states")
            at = 2 if titan else 1  # torchtitan: (x, scores, expert ids, counts)
            idx = args[at] if len(args) > at else next((kwargs[k] for k in _ROUTE_KEYS if k in kwargs), None)
            if not torch.is_tensor(x):
                raise TypeError(f"{self.label}: expected (hidden_states, top_k_index) inputs")
            x2 = x.reshape(-1, x.shape[-1])
            chunks, rows, n = [], [], x2.shape[0]
            with torch.no_grad():
                if idx is None:
                    # Every expert reads every token, expert-major ([E * T, H], Llama4); a token
                    # not routed to the expert is a zero row (scaled by a zero router score).
                    if x2.shape[0] % n_experts:
                        raise TypeError(f"{self.label}: expected (hidden_states, top_k_index) inputs")
                    xe = x2.view(n_experts, -1, x2.shape[-1])
                    n = xe.shape[1]  # each expert's view is the tokens
                    routed = [(e, (xe[e] != 0).any(dim=1).nonzero().squeeze(1)) for e in range(n_experts)]
                    routed = [(e, xe[e], tok) for e, tok in routed if tok.numel()]
                else:
                    idx = idx.reshape(x2.shape[0], -1)
                    routed = [
                        (e, x2, (idx == e).any(dim=1).nonzero().squeeze(1))
                        for e in torch.unique(idx).tolist()
                        if 0 <= e < n_experts  # else a padding slot: no expert
                    ]
                for e, xs, tok in routed:
                    gate, post = _expert_sites(m, e, xs[tok])
                    chunks.append(gate if want_pre else post)
                    rows.append(tok)
            if chunks:
                callback(torch.cat(chunks), RoutedRows(torch.cat(rows), n))

        return hook

    def _titan_ep_hooks(self, callback: Callback, wrap: Callable) -> list:
        """torchtitan's routed experts under expert parallelism: the rows are GroupedExperts' own
        input on this rank (every rank's tokens for its local experts), computed as it computes
        them (its grouped GEMM over its local experts, bfloat16, SiLU); each row's token labels
        follow the tokens through the same all-to-all (:func:`_dispatched_labels`)."""
        m, want_pre, state = self.module, self.site == "pre", {}

        def on_routed(module, args, kwargs):  # (x, scores, expert ids, counts): this rank's tokens
            state["ids"] = args[2] if len(args) > 2 else kwargs["topk_expert_ids_BLK"]
            state["counts"] = args[3] if len(args) > 3 else kwargs["num_local_tokens_per_expert_E"]

        def on_inner(module, args):  # (rows for the local experts, each local expert's count)
            if "ids" not in state:
                return  # GroupedExperts run outside its RoutedExperts: no routing to follow
            ids, counts = state.pop("ids"), state.pop("counts")
            x, per_expert = args[0], args[1]
            with torch.no_grad():
                offs = torch.cumsum(per_expert, 0, dtype=torch.int32)
                w1, w3, _ = (_local(w).bfloat16().transpose(-2, -1) for w in _titan_weights(m))
                gate = module._grouped_mm(A=x.bfloat16(), B_t=w1, offs=offs)
                rows = (
                    gate
                    if want_pre
                    else nn.functional.silu(gate) * module._grouped_mm(A=x.bfloat16(), B_t=w3, offs=offs)
                )
            n = ids.reshape(-1, ids.shape[-1]).shape[0]
            route = lambda labels: _dispatched_labels(m.token_dispatcher.ep_mesh, ids, counts, x.shape[0], labels)  # noqa: E731
            callback(rows, DispatchedRows(route, n))

        return [
            m.register_forward_pre_hook(wrap(on_routed), with_kwargs=True),
            m.inner_experts.register_forward_pre_hook(wrap(on_inner)),
        ]


def _dispatched_labels(mesh, ids: torch.Tensor, counts: torch.Tensor, rows: int, labels: torch.Tensor) -> torch.Tensor:
    """The labels ``[T, c]`` of this rank's tokens, sent where torchtitan's ``AllToAllTokenDispatcher``
    sends the tokens: sorted by expert (stable, one row per (token, chosen expert)), split by
    the ranks that hold the experts, exchanged, and laid out expert-major as its ``_permute``
    lays out the rows. Returns the labels of this rank's ``rows`` received rows, in their order."""
    dist, group, ep = torch.distributed, mesh.get_group(), mesh.size()
    device = counts.device
    order = torch.argsort(ids.reshape(-1), stable=True) // ids.shape[-1]
    sent_labels = labels.to(device)[order.to(device)].contiguous()
    sent = counts.reshape(ep, -1).long().contiguous()  # [rank, its local expert]: my tokens for it
    got = torch.empty_like(sent)
    dist.all_to_all_single(got, sent, group=group)  # [rank, my local expert]: that rank's tokens for it
    out_splits, in_splits = got.sum(1).tolist(), sent.sum(1).tolist()
    if sum(out_splits) != rows:
        raise ValueError(
            f"expert parallelism: {rows} rows reached this rank's experts but the routing sends "
            f"{sum(out_splits)}: the dispatcher padded or dropped rows; these experts cannot be measured"
        )
    out = sent_labels.new_empty((rows, labels.shape[1]))
    dist.all_to_all_single(out, sent_labels, out_splits, in_splits, group=group)
    # Rank-major segments (rank r, local expert e) as received, read expert-major.
    lens = got.reshape(-1)
    starts = (lens.cumsum(0) - lens).view_as(got).t().reshape(-1)
    lens = got.t().reshape(-1)
    seg = torch.repeat_interleave(torch.arange(lens.numel(), device=device), lens)
    within = torch.arange(rows, device=device) - (lens.cumsum(0) - lens)[seg]
    return out[starts[seg] + within]


def _nth_call(callback: Callback, k: int, n: int) -> Callback:
    """Pass on only the k-th of every n calls: the application at one depth of a module run n times per forward.

    Every application is counted, measured or not (activation-checkpoint recomputation
    replays all n), so the count stays in step with the forwards.
    """
    count = [0]

    def nth(x, rows):
        i, count[0] = count[0], (count[0] + 1) % n
        if i == k:
            callback(x, rows)

    return nth


def _row_keys(x: torch.Tensor) -> torch.Tensor:
    """An int64 hash of each row's bits (exact: integer arithmetic wraps, it does not round)."""
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[x.element_size()]
    bits = x.detach().contiguous().view(ints).to(torch.int64)
    g = torch.Generator(device="cpu").manual_seed(x.shape[-1])
    weights = torch.randint(1, 2**62, (x.shape[-1],), generator=g, dtype=torch.int64).to(x.device) | 1
    return (bits * weights).sum(-1)


_ROUTE_KEYS = ("top_k_index", "router_indices", "selected_experts")


def _channels_first(m: nn.Module) -> bool:
    """A convolution acting on channels alone (kernel 1, stride 1): a linear map over axis 1."""
    return (
        isinstance(m, (nn.Conv1d, nn.Conv2d))
        and all(k == 1 for k in m.kernel_size)
        and all(st == 1 for st in m.stride)
        and not isinstance(m.padding, str)
        and all(p == 0 for p in m.padding)
    )


def _in_out(m: nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a linear-like module, else None."""
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    if _channels_first(m):
        return m.in_channels, m.out_channels
    w = getattr(m, "weight", None)
    # A linear of its own class (I-BERT's QuantLinear): in/out features that match a [out, in] weight.
    i, o = getattr(m, "in_features", None), getattr(m, "out_features", None)
    if isinstance(i, int) and isinstance(o, int) and torch.is_tensor(w) and tuple(w.shape) == (o, i):
        return i, o
    # Megatron-core's tensor-parallel linears: a [out, in] weight of this rank's part.
    if torch.is_tensor(w) and w.dim() == 2:
        for i, o in (("input_size", "output_size_per_partition"), ("input_size_per_partition", "output_size")):
            i, o = getattr(m, i, None), getattr(m, o, None)
            if isinstance(i, int) and isinstance(o, int) and tuple(w.shape) == (o, i):
                return i, o
    # HF Conv1D stores weight as [in, out].
    if type(m).__name__ == "Conv1D" and torch.is_tensor(w) and w.dim() == 2:
        return int(w.shape[0]), int(w.shape[1])
    return None


def _dbrx_weights(m: nn.Module):
    """DBRX's experts: ``mlp.{w1, v1, w2}`` each ``[E * I, H]`` (gate, up, down), or None."""
    mlp = getattr(m, "mlp", None)
    ws = [getattr(mlp, k, None) for k in ("w1", "v1", "w2")]
    e = getattr(m, "num_experts", None)
    if not (isinstance(e, int) and e > 0 and all(isinstance(w, torch.Tensor) and w.dim() == 2 for w in ws)):
        return None
    if len({tuple(w.shape) for w in ws}) != 1 or ws[0].shape[0] % e:
        return None
    return ws


def _transposed(m: nn.Module) -> bool:
    """``gate_up_proj`` is ``[E, H, 2I]`` (used as ``x @ w``): by the module's flag, else by the shapes."""
    flag = getattr(m, "is_transposed", None)
    if flag is not None:
        return bool(flag)
    gu, down = m.gate_up_proj, m.down_proj
    return gu.shape[1] == down.shape[2] and gu.shape[2] == 2 * down.shape[1]


def _titan_weights(m: nn.Module):
    """torchtitan's routed experts (``RoutedExperts``): ``inner_experts.{w1_EFD, w3_EFD}`` ``[E, F, D]``
    (gate, up) and ``w2_EDF`` ``[E, D, F]``, fed ``(x, scores, expert ids, counts)``; or None.

    None too where their split over ranks keeps them from being measured (:func:`titan_split`);
    under expert parallelism alone the weights are the rank's local experts' (:func:`titan_ep`)."""
    inner = getattr(m, "inner_experts", None)
    ws = [getattr(inner, k, None) for k in ("w1_EFD", "w3_EFD", "w2_EDF")]
    if not (hasattr(m, "token_dispatcher") and all(isinstance(w, torch.Tensor) and w.dim() == 3 for w in ws)):
        return None
    e, f, d = ws[0].shape
    if tuple(ws[1].shape) != (e, f, d) or tuple(ws[2].shape) != (e, d, f) or titan_split(m):
        return None
    return ws


def _titan_split_dims(m: nn.Module) -> list[tuple[str, Any]]:
    """The mesh dimensions (name, placement) torchtitan's routed experts ``m`` are split on.

    FSDP's own shards (dimensions named ``*fsdp*`` / ``dp*``) are whole again in the forward."""
    w = getattr(getattr(m, "inner_experts", None), "w1_EFD", None)
    mesh = getattr(w, "device_mesh", None)
    if mesh is None:
        return []
    names = mesh.mesh_dim_names or tuple(f"dim{k}" for k in range(mesh.ndim))
    return [
        (n, p)
        for n, p in zip(names, w.placements)
        if type(p).__name__ in ("Shard", "_StridedShard") and "fsdp" not in n and not n.startswith("dp")
    ]


def titan_ep(m: nn.Module):
    """The expert-parallel mesh of torchtitan's routed experts ``m`` where that is their only split,
    else None.

    Expert parallelism alone (``w1_EFD`` sharded on its expert axis) leaves each rank whole
    experts, fed every rank's tokens for them by the dispatcher's all-to-all: a rank measures
    its experts on the rows it is sent (:class:`DispatchedRows`). Only torchtitan's own
    ``AllToAllTokenDispatcher`` is read (its row layout is known; others pad or reorder)."""
    split = _titan_split_dims(m)
    d = getattr(m, "token_dispatcher", None)
    if not split or type(d).__name__ != "AllToAllTokenDispatcher" or getattr(d, "ep_mesh", None) is None:
        return None
    if any(type(p).__name__ != "Shard" or getattr(p, "dim", None) != 0 for _, p in split):
        return None  # expert tensor parallelism: part of every expert on each rank
    return d.ep_mesh


def titan_split(m: nn.Module) -> str | None:
    """How torchtitan's routed experts ``m`` are split over ranks (their mesh dimensions) where that
    split keeps them from being measured, else None.

    Expert tensor parallelism leaves each rank part of every expert, and expert parallelism
    through a dispatcher other than torchtitan's all-to-all one rows in a layout not known
    here: neither rank can give the rows of whole experts. Expert parallelism alone is
    measured (:func:`titan_ep`)."""
    split = _titan_split_dims(m)
    if not split or titan_ep(m) is not None:
        return None
    return ", ".join(n for n, _ in split)


def _experts_layout(m: nn.Module) -> tuple[int, int] | None:
    """(hidden, intermediate) of a fused experts module of a known layout, else None.

    transformers' standard ``gate_up_proj`` ``[E, 2I, H]`` / ``down_proj`` ``[E, H, I]``,
    or transposed ``[E, H, 2I]`` / ``[E, I, H]`` (flagged ``is_transposed``, or Llama4's,
    told by the shapes); DBRX's ``mlp.{w1, v1, w2}``; torchtitan's ``RoutedExperts``.
    """
    dbrx = _dbrx_weights(m)
    if dbrx is not None:
        return int(dbrx[0].shape[1]), int(dbrx[0].shape[0] // m.num_experts)
    titan = _titan_weights(m)
    if titan is not None:
        return int(titan[0].shape[2]), int(titan[0].shape[1])
    gu, down = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
    if not (isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor) and gu.dim() == 3 and down.dim() == 3):
        return None
    if not getattr(m, "has_gate", True):
        return None
    if _transposed(m):  # [E, H, 2I] and [E, I, H]
        h, two_i = gu.shape[1], gu.shape[2]
        ok = tuple(down.shape[1:]) == (two_i // 2, h)
    else:  # [E, 2I, H] and [E, H, I]
        two_i, h = gu.shape[1], gu.shape[2]
        ok = tuple(down.shape[1:]) == (h, two_i // 2)
    return (int(h), int(two_i // 2)) if ok and two_i % 2 == 0 else None


def _n_experts(m: nn.Module) -> int:
    if _dbrx_weights(m) is not None:
        return int(m.num_experts)
    titan = _titan_weights(m)
    return int(titan[0].shape[0]) if titan is not None else int(m.gate_up_proj.shape[0])


def _expert_sites(m: nn.Module, e: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pre, post) of expert ``e`` on its rows ``x``: the gate, and the input of its down projection."""
    dbrx = _dbrx_weights(m)
    if dbrx is not None:  # the model's own per-expert views of w1 (gate) and v1 (up)
        i = dbrx[0].shape[0] // m.num_experts
        gate = x @ dbrx[0].view(-1, i, x.shape[-1])[e].T
        up = x @ dbrx[1].view(-1, i, x.shape[-1])[e].T
        return gate, m.mlp.activation_fn(gate) * up
    titan = _titan_weights(m)
    if titan is not None:  # as GroupedExperts computes: its own grouped GEMM, in bfloat16, SiLU
        inner, offs = m.inner_experts, torch.tensor([x.shape[0]], dtype=torch.int32, device=x.device)
        w1, w3 = (_local(w)[e : e + 1].bfloat16().transpose(-2, -1) for w in titan[:2])
        gate = inner._grouped_mm(A=x.bfloat16(), B_t=w1, offs=offs)
        return gate, nn.functional.silu(gate) * inner._grouped_mm(A=x.bfloat16(), B_t=w3, offs=offs)
    gu = _expert_gate_up(m, e, x)
    return _gate_half(m, gu), _apply_gate(m, gu)


def _local(w: torch.Tensor) -> torch.Tensor:
    """A DTensor parameter's local tensor (FSDP's, whole in the forward), else ``w``."""
    return w.to_local() if hasattr(w, "to_local") else w


def _expert_gate_up(m: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    w = m.gate_up_proj[e]
    out = x @ w if _transposed(m) else nn.functional.linear(x, w)
    bias = getattr(m, "gate_up_proj_bias", None)
    if getattr(m, "has_bias", False) and bias is not None:
        out = out + bias[e]
    return out


def _gate_half(m: nn.Module, gu: torch.Tensor) -> torch.Tensor:
    if getattr(m, "is_concatenated", True):
        return gu[..., : gu.shape[-1] // 2]
    return gu[..., ::2]  # interleaved [gate0, up0, gate1, up1, ...]


def _apply_gate(m: nn.Module, gu: torch.Tensor) -> torch.Tensor:
    apply = getattr(m, "_apply_gate", None)
    if callable(apply):  # the model's own gating code
        return apply(gu)
    gate, up = gu.chunk(2, dim=-1)
    return m.act_fn(gate) * up


# Discovery's public names, where they were before discovery had its own module
# (imported last: discovery imports Site from here).
from capscale.probe.discovery import (  # noqa: E402
    ARCHITECTURES,
    KNOWN_PAIRS,
    Architecture,
    Discovery,
    Skipped,
    discover,
    discover_sites,
)

__all__ = [
    "ARCHITECTURES",
    "CAPTURES",
    "DEFAULT_CAPTURE",
    "KNOWN_PAIRS",
    "SHARED_EXPERT",
    "SITE_NAMES",
    "Architecture",
    "Callback",
    "Discovery",
    "NoFFNError",
    "Site",
    "SiteDiscoveryError",
    "SiteSpec",
    "Skipped",
    "discover",
    "discover_sites",
]
