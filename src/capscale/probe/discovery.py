"""Discovery: which modules of a model are its FFN sites, found by structure.

Discovery reads what the model is, not what its modules are called: the
stack(s) of repeated blocks (``nn.ModuleList`` / ``nn.Sequential`` of blocks,
e.g. ``h``, ``layers``, ``block``, an encoder and a decoder stack), and in each
block the feed-forward path: an expanding projection ``H → I`` (``nn.Linear``
and its subclasses, HF ``Conv1D`` with its ``[in, out]`` weight) and the
contracting projection ``I → H`` that consumes it. Attention's projections
are told apart by shape (no ``I → H`` partner) and by place (the pair whose
common parent is deepest, outside any ``attn`` / ``attention`` module). A
gated FFN has two ``H → I`` projections: ``pre`` is the gate (the one that
feeds the nonlinearity), found by name or by one traced forward of the FFN
module; a fused ``gate_up`` projection ``H → 2I`` is captured as its gate
half. MoE layers with fused 3-D expert weights (transformers' ``*Experts``)
are measured over the tokens each expert saw, pooled over experts; shared
experts are their own stack (``shared-expert``). Any block that is not
measured is reported with the reason (``Discovery.skipped``), never dropped
in silence. Other models name their sites explicitly, by pattern
(``"blocks.{layer}.ffn.fc1"``) or by module objects.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from capscale.probe.sites import (
    CAPTURES,
    DEFAULT_CAPTURE,
    SHARED_EXPERT,
    SITE_NAMES,
    NoFFNError,
    Site,
    SiteDiscoveryError,
    SiteSpec,
    _channels_first,
    _experts_layout,
    _in_out,
    gate_channels,
    titan_split,
)

# Names may carry wrapper prefixes (``module.`` for DDP, ``_orig_mod.`` for
# torch.compile, ``transformer.`` / ``model.`` for HF), so patterns match a suffix.
_ANY_PREFIX = r"(?:.*\.)?"
# Gate projections of gated FFNs, by name (else one traced forward decides).
_GATE_NAME = re.compile(r"(?:^|[._])(?:gate(?:_proj)?|w1|wi_0|fc1_g|gate_fc)$")
_ATTENTION_NAME = re.compile(r"(?:^|\.)[^.]*(?:attn|attention)[^.]*(?:\.|$)", re.IGNORECASE)


@dataclass(frozen=True)
class Architecture:
    """A family of models recognised by hook-point name: one regex per site, group 1 = layer index."""

    name: str
    pre: str
    post: str
    pre_capture: str = "output"
    post_capture: str = "input"
    example: str = ""

    def pattern(self, site: str) -> str:
        return self.pre if site == "pre" else self.post

    def capture(self, site: str) -> str:
        return self.pre_capture if site == "pre" else self.post_capture


# Models whose FFN tensors are hook points without weights: no shape to read.
ARCHITECTURES = (
    Architecture(
        "TransformerLens",
        r"blocks\.(\d+)\.mlp\.hook_pre",
        r"blocks\.(\d+)\.mlp\.hook_post",
        "output",
        "output",
        example="blocks.{i}.mlp.hook_pre (output) / blocks.{i}.mlp.hook_post (output)",
    ),
)
# Known (up, down) names inside a block: the fast path, and the answer where
# shape alone cannot decide (an FFN as wide as the residual stream, I = H).
KNOWN_PAIRS = (
    ("mlp.c_fc", "mlp.c_proj"),  # capscale GPT, GPT-2, Starcoder2 (c_fc is the gate under SwiGLU)
    ("mlp.gate_proj", "mlp.down_proj"),  # Llama, Mistral, Qwen, Gemma, OLMo
)


# -- structural discovery ------------------------------------------------------


@dataclass(frozen=True)
class Skipped:
    """A block that is not measured, and why."""

    stack: str
    layer: int
    name: str
    reason: str

    def __str__(self) -> str:
        where = f"stack {self.stack!r} " if self.stack else ""
        return f"{where}layer {self.layer} ({self.name}): {self.reason}"


@dataclass
class Discovery:
    """What discovery found: the sites, the blocks it could not measure, and how it decided."""

    sites: list[Site]
    skipped: list[Skipped] = field(default_factory=list)
    source: str = ""

    def describe(self) -> str:
        stacks = sorted({s.stack for s in self.sites})
        layers = {st: sorted({s.layer for s in self.sites if s.stack == st}) for st in stacks}
        parts = [f"{(st or 'layers')}: {len(v)} ({v[0]}-{v[-1]})" for st, v in layers.items() if v]
        text = f"sites found by {self.source}; " + ", ".join(parts)
        if self.skipped:
            text += "; not measured: " + "; ".join(str(s) for s in self.skipped)
        return text


_CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)


def _children(m: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """(key, block) of a container whose children are all blocks (non-leaf modules), else None.

    A ``ModuleDict`` is a stack when its keys are layer indices (torchtitan keeps
    ``layers`` as ``{"0": block, …}`` so a pipeline stage keeps its layers' names) or
    when its children are all of one class.
    """
    if not isinstance(m, _CONTAINERS) or len(m) == 0:
        return None
    kids = list(m.items()) if isinstance(m, nn.ModuleDict) else [(str(i), k) for i, k in enumerate(m)]
    if not all(any(True for _ in k.children()) for _, k in kids):
        return None
    if isinstance(m, nn.ModuleDict) and not (all(k.isdigit() for k, _ in kids) or len({type(b) for _, b in kids}) == 1):
        return None
    return kids


def _is_block(m: nn.Module) -> bool:
    """A block: an FFN and more (attention, ConvNeXt's depthwise conv), not an FFN alone (an expert, MobileBERT's ffn.k)."""
    ffn = _find_ffn(m)
    if isinstance(ffn, str):  # a block whose FFN is convolutional (SegFormer's Mix-FFN) is still a block
        return ffn.startswith("convolutional FFN") and len(_linears(m)) > 2
    pair = (ffn.pre[1], ffn.post[1])
    return any(
        (_in_out(k) is not None or isinstance(k, nn.modules.conv._ConvNd)) and all(k is not p for p in pair)
        for k in m.modules()
    )


def _inner_stack(block: nn.Module) -> tuple[str, list[tuple[str, nn.Module]]] | None:
    """A stack of blocks inside a block (Swin's stage.blocks, ALBERT's group.albert_layers), else None."""
    kids = _children(block)
    if kids is not None and all(_is_block(b) for _, b in kids):
        return "", kids  # the block is itself a list of blocks (Funnel's encoder.blocks[i])
    for name, m in block.named_modules():
        if not name or "expert" in name.lower():
            continue
        kids = _children(m)
        if kids is not None and all(_is_block(b) for _, b in kids):
            return name, kids
    return None


def _flatten(prefix: str, kids: list[tuple[str, nn.Module]]) -> list[tuple[int, str, nn.Module]]:
    """(layer, path, block) in order, stages opened into their blocks, layers counted through the stages.

    Integer keys of a ``ModuleDict`` are the layer index (a pipeline stage holding
    layers "2", "3" reports layers 2 and 3); nested stacks count depth in order.
    """
    out: list[tuple[str, nn.Module]] = []
    nested = False
    for key, block in kids:
        inner = _inner_stack(block)
        if inner is None:
            out.append((f"{prefix}.{key}", block))
            continue
        nested = True
        rel, grand = inner
        base = f"{prefix}.{key}" + (f".{rel}" if rel else "")
        out += [(p, b) for _, p, b in _flatten(base, grand)]
    if not nested and all(k.isdigit() for k, _ in kids):
        return [(int(k), p, b) for (k, _), (p, b) in zip(kids, out)]
    return [(i, p, b) for i, (p, b) in enumerate(out)]


def _stacks(model: nn.Module) -> list[tuple[str, list[tuple[int, str, nn.Module]]]]:
    """The outermost containers of blocks (ModuleList / Sequential / ModuleDict), stages opened: (name, blocks)."""
    found: list[tuple[str, list[tuple[int, str, nn.Module]]]] = []
    inside: list[str] = []
    for name, m in model.named_modules():
        if any(name == p or name.startswith(p + ".") for p in inside):
            continue
        kids = _children(m)
        if kids is not None:
            found.append((name, _flatten(name, kids)))
            inside.append(name)
    return found


def _stack_labels(names: list[str]) -> list[str]:
    if len(names) == 1:
        return [""]
    labels = []
    for n in names:
        lower = n.lower()
        hits = [k for k in ("encoder", "decoder") if k in lower.split(".") or lower.endswith(k) or f"{k}." in lower]
        labels.append(hits[-1] if len(hits) >= 1 else n)
    if len(set(labels)) < len(labels):  # e.g. two encoders: the full path is unique
        return list(names)
    return labels


def _linears(block: nn.Module, skip: Iterable[str] = ()) -> list[tuple[str, nn.Module, int, int]]:
    skip = tuple(skip)
    out = []
    for name, m in block.named_modules():
        if any(name == p or name.startswith(p + ".") for p in skip):
            continue
        dims = _in_out(m)
        if dims is not None and name:
            out.append((name, m, *dims))
    return out


def _depth_of_common_parent(a: str, b: str) -> int:
    pa, pb = a.split(".")[:-1], b.split(".")[:-1]
    n = 0
    for x, y in zip(pa, pb):
        if x != y:
            break
        n += 1
    return n


def _common_parent(a: str, b: str) -> str:
    return ".".join(a.split(".")[: _depth_of_common_parent(a, b)])


@dataclass
class _FFN:
    pre: tuple[str, nn.Module]
    post: tuple[str, nn.Module]
    part: tuple[int, int, int] | None = None


def _find_ffn(block: nn.Module, skip: Iterable[str] = ()) -> _FFN | str:
    """The FFN of one block, or the reason there is none."""
    lins = _linears(block, skip)
    if not lins:
        return "no linear projections"
    by_name = {n: (m, i, o) for n, m, i, o in lins}
    for up, down in KNOWN_PAIRS:
        if up in by_name and down in by_name:
            return _FFN((up, by_name[up][0]), (down, by_name[down][0]))
    # The residual width H: what most projections of a block read (q, k, v, the FFN's up/gate).
    # A pair on another width (reading and writing it) is still a candidate, ranked after (Zamba's
    # attention reads [h, h0], 2H wide, so 2H is the most read width).
    ins = [i for *_, i, _ in lins]
    hidden = max(set(ins), key=lambda d: (ins.count(d), -ins.index(d)))
    pairs = []  # (score, up, down, fused)
    mixers: dict[str, str] = {}
    conv_ffn: list[tuple[str, str, str]] = []  # pairs with a convolution between (Mix-FFN)
    order = {n: k for k, (n, *_) in enumerate(lins)}
    for un, um, ui, uo in lins:
        for dn, dm, di, do in lins:
            if dm is um or ui != do:
                continue
            if di == uo:
                fused = False
            elif uo == 2 * di:
                fused = True
            else:
                continue
            # I < H is allowed (fine-grained MoE experts: DeepSeek-V3's shared expert has I = H / 3.5)
            # but loses to any expanding pair.
            parent = _common_parent(un, dn)
            if parent not in mixers:
                mixers[parent] = _in_mixer(block, parent)
            if mixers[parent]:
                attn = _ATTENTION_NAME.search(un) or _ATTENTION_NAME.search(dn)
                if mixers[parent] == "conv" and di > ui and not attn:
                    conv_ffn.append((un, dn, parent))
                continue
            attn = bool(_ATTENTION_NAME.search(un) or _ATTENTION_NAME.search(dn))
            score = (
                not attn,
                ui == hidden,
                di > ui,  # strictly expanding beats square look-alikes
                _depth_of_common_parent(un, dn),
                not fused,
                order[dn] > order[un],
            )
            pairs.append((score, un, dn, fused))
    if conv_ffn and (not pairs or not max(p[0] for p in pairs)[0]):  # nothing else but attention
        un, dn, parent = conv_ffn[0]
        conv = next(n for n, m in block.get_submodule(parent).named_modules() if isinstance(m, nn.modules.conv._ConvNd))
        return (
            f"convolutional FFN: a convolution ({parent}.{conv}) sits between {un} ({by_name[un][1]}->"
            f"{by_name[un][2]}) and {dn}, so the nonlinearity's input is not a projection's output "
            f"(a Mix-FFN); name the sites: pre = the output of the module holding the convolution, "
            f"post = the input of {dn}"
        )
    if not pairs:
        return "no expanding projection H -> I with a contracting partner I -> H"
    pairs.sort(key=lambda p: p[0], reverse=True)
    best = pairs[0][0]
    if not best[0]:
        return "only attention projections"
    top = [p for p in pairs if p[0] == best]
    downs = {dn for _, _, dn, _ in top}
    if len(downs) > 1:
        # A tie (MobileBERT's bottleneck pair looks like its FFN): the pair whose up projection
        # sits beside an activation module is the FFN.
        active = [p for p in top if _beside_activation(block, p[1])]
        if len({dn for _, _, dn, _ in active}) == 1:
            top, downs = active, {active[0][2]}
    if len(downs) > 1 and not best[2]:
        return "only square projections H -> H (attention-like): no expanding pair"
    if len(downs) > 1:
        shapes = ", ".join(f"{un} {by_name[un][1]}->{by_name[un][2]} / {dn}" for _, un, dn, _ in top)
        return (
            f"ambiguous FFN: contracting projections {sorted(downs)} all fit (H = {hidden}; "
            f"pairs {shapes}; equal on every rule: outside attention, expanding, deepest common parent)"
        )
    dn = top[0][2]
    ups = [(un, fused) for _, un, _, fused in top]
    if len(ups) == 1:
        un, fused = ups[0]
        part = None
        if fused:  # gate_up: which channels feed the activation, by one traced forward
            part = _fused_gate_part(block, un, dn, by_name[un][2])
        return _FFN((un, by_name[un][0]), (dn, by_name[dn][0]), part)
    gate = _gate_of(block, [u for u, _ in ups], dn)
    if gate is None:
        return f"gated FFN: cannot tell the gate among {[u for u, _ in ups]}; name the sites explicitly"
    return _FFN((gate, by_name[gate][0]), (dn, by_name[dn][0]))


_ACTIVATION = re.compile(r"Activation|GELU|ReLU|SiLU|Swish|Tanh|Mish|Sigmoid|Softplus", re.IGNORECASE)


def _beside_activation(block: nn.Module, up: str) -> bool:
    """The up projection's parent also holds an activation module (HF's ``intermediate_act_fn``)."""
    parent = up.rsplit(".", 1)[0] if "." in up else ""
    mod = block.get_submodule(parent) if parent else block
    return any(
        type(m).__module__ == "torch.nn.modules.activation" or _ACTIVATION.search(type(m).__name__)
        for m in mod.children()
    )


def _in_mixer(block: nn.Module, parent: str) -> str:
    """Whether a pair under ``parent`` sits beside a convolution: "ssm" in a state-space mixer (Mamba's
    in_proj/out_proj, with ``A_log`` / ``dt_bias``: no FFN), "conv" otherwise (SegFormer's Mix-FFN), else ""."""
    if not parent:
        return ""
    mod = block.get_submodule(parent)
    if any(n.split(".")[-1] in ("A_log", "dt_bias") for n, _ in mod.named_parameters()):
        return "ssm"
    convs = [m for m in mod.modules() if isinstance(m, nn.modules.conv._ConvNd) and not _channels_first(m)]
    return "conv" if convs else ""


def _gate_of(block: nn.Module, ups: list[str], down: str) -> str | None:
    """Which of a gated FFN's H -> I projections feeds the nonlinearity: by name, else by a traced forward."""
    named = [u for u in ups if _GATE_NAME.search(u)]
    if len(named) == 1:
        return named[0]
    parent = down
    for u in ups:
        parent = _common_parent(parent + ".x", u)
    ffn = block.get_submodule(parent) if parent else block
    traced = _trace_gate(ffn, [block.get_submodule(u) for u in ups])
    return None if traced is None else ups[traced]


_NONLINEAR = {
    torch.nn.functional.silu,
    torch.nn.functional.gelu,
    torch.nn.functional.relu,
    torch.nn.functional.mish,
    torch.nn.functional.softplus,
    torch.nn.functional.sigmoid,
    torch.sigmoid,
    torch.tanh,
    torch.relu,
    torch.Tensor.relu,
    torch.Tensor.sigmoid,
    torch.Tensor.tanh,
}


_FUSED_LAYOUT: dict[type, str] = {}  # FFN class -> "first" / "second" / "interleaved"


def _fused_gate_part(block: nn.Module, up: str, down: str, width: int) -> tuple[int, int, int]:
    """The gate's channels of a fused gate_up output: traced once per FFN class.

    The view of the fused output that enters the nonlinearity tells: offset 0 = the first
    half (Phi-3, transformers' ``chunk(2)``), offset I = the second, stride 2 = interleaved.
    Without a trace (an FFN module that wants more than hidden states) the first half.
    """
    parent = _common_parent(up, down)
    ffn = block.get_submodule(parent) if parent else block
    layout = _FUSED_LAYOUT.get(type(ffn))
    if layout is None:
        layout = _trace_fused(ffn, block.get_submodule(up)) or "first"
        _FUSED_LAYOUT[type(ffn)] = layout
    return gate_channels(layout, width)


def _trace_fused(ffn: nn.Module, up: nn.Module) -> str | None:
    from torch.overrides import TorchFunctionMode

    fused: list[torch.Tensor] = []
    fed: list[str] = []

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            x = args[0] if args else None
            if func in _NONLINEAR and torch.is_tensor(x) and fused and x.dim() == fused[0].dim():
                base = fused[0]
                if x.untyped_storage().data_ptr() == base.untyped_storage().data_ptr() and x is not base:
                    offset = x.storage_offset() - base.storage_offset()
                    step = x.stride(-1)
                    half = base.shape[-1] // 2
                    fed.append("interleaved" if step == 2 else "second" if offset == half else "first")
            return func(*args, **(kwargs or {}))

    handle = up.register_forward_hook(lambda m, a, o: fused.append(o) if torch.is_tensor(o) else None)
    p = next(ffn.parameters(), None)
    try:
        x = torch.randn(1, 2, _in_out(up)[0], dtype=p.dtype, device=p.device) if p is not None else None
        if x is None or p.device.type == "meta":
            return None
        with torch.no_grad(), Watch():
            ffn(x)
    except Exception:  # an FFN module that wants more than hidden states: no trace
        return None
    finally:
        handle.remove()
    return fed[0] if len(set(fed)) == 1 else None


def _trace_gate(ffn: nn.Module, ups: list[nn.Module]) -> int | None:
    """Run the FFN module once on random input; the up whose output enters a nonlinearity is the gate."""
    from torch.overrides import TorchFunctionMode

    width = _in_out(ups[0])[0]
    outs: dict[int, int] = {}
    fed: list[int] = []

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in _NONLINEAR and args and id(args[0]) in outs:
                fed.append(outs[id(args[0])])
            return func(*args, **(kwargs or {}))

    handles = [
        u.register_forward_hook(lambda m, a, o, k=k: outs.__setitem__(id(o), k) if torch.is_tensor(o) else None)
        for k, u in enumerate(ups)
    ]
    p = next(ffn.parameters(), None)
    try:
        x = torch.randn(
            1, 2, width, dtype=p.dtype if p is not None else None, device=p.device if p is not None else None
        )
        with torch.no_grad(), Watch():
            ffn(x)
    except Exception:  # an FFN module that wants more than hidden states: no trace
        return None
    finally:
        for h in handles:
            h.remove()
    return fed[0] if len(set(fed)) == 1 else None


def _block_sites(block: nn.Module, prefix: str, layer: int, stack: str) -> tuple[list[Site], list[Skipped]]:
    sites: list[Site] = []
    experts = [(n, m) for n, m in block.named_modules() if n and _experts_layout(m) is not None]
    split = [(n, m, titan_split(m)) for n, m in block.named_modules() if n and titan_split(m)]
    skip = [n for n, _ in experts] + [n for n, _, _ in split]
    moe_3d = [
        (n, m)
        for n, m in block.named_modules()
        if n
        and not any(n == p or n.startswith(p + ".") for p in skip)
        and ("expert" in n.lower() or "expert" in type(m).__name__.lower())
        and any(p.dim() == 3 for p in m.parameters(recurse=False))
    ]
    skipped = [
        Skipped(
            stack,
            layer,
            f"{prefix}.{n}",
            "fused 3-D expert weights of an unknown layout ("
            + ", ".join(f"{k} {list(p.shape)}" for k, p in m.named_parameters(recurse=False))
            + "; known: gate_up_proj [E, 2I, H] or [E, H, 2I] with down_proj, DBRX's mlp.w1/v1/w2, "
            + "torchtitan's RoutedExperts): not reachable",
        )
        for n, m in moe_3d
    ]
    skipped += [
        Skipped(
            stack,
            layer,
            f"{prefix}.{n}",
            f"routed experts split over ranks (mesh dimension {dims}): expert-tensor parallelism "
            "leaves each rank part of every expert, and expert parallelism is followed only through "
            "torchtitan's AllToAllTokenDispatcher with its ep mesh wired (another dispatcher pads or "
            "reorders rows in a layout not known here); measured without that split",
        )
        for n, _, dims in split
    ]
    moe_3d += [(n, None) for n, _, _ in split]
    routed = _expert_modules(block, skip)
    for n, kids in routed:
        ffns = [_find_ffn(kid) for kid in kids]
        parent = _moe_of(block, n, len(kids), _in_out(ffns[0].pre[1])[0])
        moe = block.get_submodule(parent) if parent else block  # its input: the tokens to route
        members = tuple((kid, f.pre[1], f.post[1]) for kid, f in zip(kids, ffns))
        for s in SITE_NAMES:
            part = ffns[0].part if s == "pre" else None
            sites.append(Site(layer, s, f"{prefix}.{n}", moe, DEFAULT_CAPTURE[s], stack, part, members=members))
    moe_3d += [(n, None) for n, _ in routed]
    for n, m in experts:
        for s in SITE_NAMES:
            sites.append(Site(layer, s, f"{prefix}.{n}", m, DEFAULT_CAPTURE[s], stack, experts=True))
    extra = _ffn_list(block, skip + [n for n, _ in moe_3d])
    if not extra and not (experts or moe_3d):
        first = _find_ffn(block, skip)
        if isinstance(first, str) and first.startswith("ambiguous"):
            extra = _ffn_modules(block, skip)  # FFNs side by side (a Conformer's two half-step FFNs)
    for path, sub in extra:
        f = _find_ffn(sub)
        own = _join(stack, path)
        sites.append(Site(layer, "pre", f"{prefix}.{path}.{f.pre[0]}", f.pre[1], "output", own, f.part))
        sites.append(Site(layer, "post", f"{prefix}.{path}.{f.post[0]}", f.post[1], "input", own))
    ffn = _find_ffn(block, skip + [n for n, _ in moe_3d] + [p for p, _ in extra])
    if isinstance(ffn, str):
        # Beside routed experts, "no FFN" is normal (no shared expert); a doubtful one is said.
        if not (experts or moe_3d or extra) or ffn.startswith(("ambiguous", "gated")):
            skipped.append(Skipped(stack, layer, prefix, ffn))
        return sites, skipped
    own = stack
    if experts or moe_3d:  # the dense FFN beside routed experts is the shared expert
        own = f"{stack}/{SHARED_EXPERT}" if stack else SHARED_EXPERT
    sites.append(Site(layer, "pre", f"{prefix}.{ffn.pre[0]}", ffn.pre[1], "output", own, ffn.part))
    sites.append(Site(layer, "post", f"{prefix}.{ffn.post[0]}", ffn.post[1], "input", own))
    return sites, skipped


def _ffn_modules(block: nn.Module, skip: list[str]) -> list[tuple[str, nn.Module]]:
    """Submodules that are each an FFN and nothing more, where a block's FFN is ambiguous: two or more, else none.

    Each is its own stack, named by its path in the block (a Conformer's ``ffw_layer_start``
    and ``ffw_layer_end``); experts are not FFNs side by side.
    """
    out: list[tuple[str, nn.Module]] = []
    for n, m in block.named_modules():
        if not n or "expert" in n.lower() or any(n == p or n.startswith(p + ".") for p in skip):
            continue
        if any(n.startswith(p + ".") for p, _ in out) or _in_out(m) is not None:
            continue
        conv = any(isinstance(k, nn.modules.conv._ConvNd) and not _channels_first(k) for k in m.modules())
        if len(_linears(m)) == 2 and not conv and not isinstance(_find_ffn(m), str):
            out.append((n, m))  # (a GLU convolution module, a Conformer's lconv, is no FFN)
    return out if len(out) >= 2 else []


def _ffn_list(block: nn.Module, skip: list[str]) -> list[tuple[str, nn.Module]]:
    """Extra FFNs of a block held in a list (MobileBERT's ``ffn.0 …``): (path in the block, FFN module).

    A container (not of experts) whose members are each an FFN and nothing more; each
    member is its own stack, named by its path in the block (``ffn.0``).
    """
    out: list[tuple[str, nn.Module]] = []
    for n, m in block.named_modules():
        if not n or "expert" in n.lower() or any(n == p or n.startswith(p + ".") for p in skip):
            continue
        kids = _children(m)
        if kids is None or any(n.startswith(p + ".") for p, _ in out):
            continue
        if all(len(_linears(k)) == 2 and not isinstance(_find_ffn(k), str) for _, k in kids):
            out += [(f"{n}.{key}", k) for key, k in kids]
    return out


def _moe_of(block: nn.Module, experts: str, n_experts: int, hidden: int) -> str:
    """The path of the module whose input holds the tokens the experts at ``experts`` are routed.

    The experts' container's parent, or, where that is fed rows already dispatched (Megatron's
    ``SequentialMLP``: sorted by expert, repeated top-k times), the nearest ancestor that holds
    the router: a child named ``router`` or ``gate`` (outside the experts) with a ``[E, hidden]``
    weight, E ≥ the experts.
    """
    path = experts.rsplit(".", 1)[0] if "." in experts else ""
    at = path
    while True:
        m = block.get_submodule(at) if at else block
        for name, child in m.named_children():
            w = getattr(child, "weight", None)
            inside = experts.startswith(f"{at}.{name}." if at else f"{name}.") or experts == (
                f"{at}.{name}" if at else name
            )
            router = ("router" in name or "gate" in name) and torch.is_tensor(w) and w.dim() == 2
            if router and not inside and w.shape[1] == hidden and w.shape[0] >= n_experts:
                return at
        if not at:
            return path
        at = at.rsplit(".", 1)[0] if "." in at else ""


def _expert_modules(block: nn.Module, skip: list[str]) -> list[tuple[str, list[nn.Module]]]:
    """Containers of routed expert modules (a ModuleList/ModuleDict of same-class FFNs), with the experts."""
    out: list[tuple[str, list[nn.Module]]] = []
    for n, m in block.named_modules():
        if not n or any(n == p or n.startswith(p + ".") for p, _ in out) or n in skip:
            continue
        if isinstance(m, (nn.ModuleList, nn.ModuleDict)) and len(m) >= 2 and "expert" in n.lower():
            kids = list(m.values()) if isinstance(m, nn.ModuleDict) else list(m)
            # Parameter-free members (NLLB-MoE keeps its expert Dropout in the dict) are not experts.
            kids = [k for k in kids if any(True for _ in k.parameters())]
            if (
                len(kids) >= 2
                and len({type(k) for k in kids}) == 1
                and all(not isinstance(_find_ffn(k), str) for k in kids)
            ):
                out.append((n, kids))
    return out


def _structural(model: nn.Module) -> Discovery:
    stacks = _stacks(model)
    if not stacks:
        raise NoFFNError(
            f"{type(model).__name__} has no stack of repeated blocks (nn.ModuleList of layers) "
            f"to find an FFN in.\n{_hint()}"
        )
    results, reasons = [], set()
    for name, blocks in stacks:
        per = [_block_sites(b, path, i, "") for i, path, b in blocks]
        # A stack is kept when it has sites, or FFN candidates it could not take (named in
        # a warning, never dropped); a stack with no candidate at all (convolutions, Mamba) is not.
        if any(s for s, _ in per) or any(not _no_pair(sk.reason) for _, sks in per for sk in sks):
            results.append((name, per))
        reasons |= {sk.reason for _, sks in per for sk in sks}
    if not any(s for _, per in results for s, _ in per):
        if all(_no_pair(r) for r in reasons):
            raise NoFFNError(
                f"{type(model).__name__} has no FFN: its blocks ({', '.join(n for n, _ in stacks)}) hold "
                f"no expanding/contracting projection pair ({'; '.join(sorted(reasons))}). Nothing to "
                f"measure; if the model does have one, name it.\n{_hint()}"
            )
        found = [str(replace(sk, stack=name)) for name, per in results for _, sks in per for sk in sks]
        raise NoFFNError(
            f"{type(model).__name__}: FFN candidates were found but none could be measured:\n  "
            + "\n  ".join(found)
            + f"\n{_hint()}"
        )
    kept = {name for name, per in results if any(s for s, _ in per)}
    depths = _applications(model, [(name, blocks) for name, blocks in stacks if name in kept])
    if depths:
        results = [(name, [_at_depths(s, sk, depths) for s, sk in per]) for name, per in results]
    labels = _stack_labels([n for n, _ in results])
    sites, skipped = [], []
    for label, (_, per) in zip(labels, results):
        for s, sk in per:
            sites += [replace(x, stack=_join(label, x.stack)) for x in s]
            skipped += [replace(x, stack=_join(label, x.stack)) for x in sk]
    return Discovery(sites, skipped, "structure (stacks of blocks, FFN projections by shape)")


def _applications(model: nn.Module, stacks) -> dict[str, list[int]]:
    """Blocks run at several depths in one forward (ALBERT's shared layer): block path -> its depths.

    Taken from one traced forward on the model's dummy inputs, only where the model's
    config says it runs more layers than it holds blocks (``num_hidden_layers`` above a
    stack's length, Funnel's ``block_repeats``). Depth = the order of the stack's block calls.
    """
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "num_hidden_layers", None)
    repeats = getattr(cfg, "block_repeats", None) or ()
    if not ((isinstance(n, int) and any(0 < len(blocks) < n for _, blocks in stacks)) or any(r > 1 for r in repeats)):
        return {}
    calls: list[str] = []
    handles = [
        b.register_forward_pre_hook(lambda m, a, path=path: calls.append(path))
        for _, blocks in stacks
        for _, path, b in blocks
    ]
    try:
        p = next(model.parameters())
        inputs = {k: v.to(p.device) for k, v in model.dummy_inputs.items()}
        with torch.no_grad(), torch.random.fork_rng(devices=[p.device] if p.device.type == "cuda" else []):
            model(**inputs)
    except Exception as exc:  # a model that wants more than its dummy inputs: say so, do not guess
        warnings.warn(
            f"{type(model).__name__} may run blocks at several depths (config: {n} layers, "
            f"block_repeats {list(repeats)}), but one forward on its dummy inputs failed ({exc!r}); "
            "each block's applications are pooled in one row",
            stacklevel=3,
        )
        return {}
    finally:
        for h in handles:
            h.remove()
    out: dict[str, list[int]] = {}
    for _, blocks in stacks:
        paths = {path for _, path, _ in blocks}
        order = [c for c in calls if c in paths]
        if len(order) > len(set(order)):
            for depth, path in enumerate(order):
                out.setdefault(path, []).append(depth)
    return out


def _at_depths(sites: list[Site], skipped: list[Skipped], depths: dict[str, list[int]]):
    """One site per application of a block run at several depths, its depth as the layer."""
    out = []
    for x in sites:
        block = next((p for p in depths if x.name.startswith(p + ".")), None)
        if block is None:
            out.append(x)
            continue
        ds = depths[block]
        out += [replace(x, layer=d, call=(j, len(ds))) for j, d in enumerate(ds)]
    sk = [replace(x, layer=depths[x.name][0]) if x.name in depths else x for x in skipped]
    return out, sk


_NO_PAIR = ("no linear projections", "no expanding projection", "only attention", "only square")


def _no_pair(reason: str) -> bool:
    """The reason says the block has no FFN candidate at all (not: candidates it could not take)."""
    return reason.startswith(_NO_PAIR)


def _join(outer: str, inner: str) -> str:
    return f"{outer}/{inner}" if outer and inner else outer or inner


def _hint() -> str:
    return (
        "Name the sites explicitly, e.g.\n"
        '  capscale.attach(model, sites={"pre": "blocks.{layer}.ffn.fc1", '
        '"post": ("blocks.{layer}.ffn.fc2", "input")})\n'
        "or with module objects:\n"
        '  capscale.attach(model, sites={"pre": [b.ffn.fc1 for b in model.blocks], '
        '"post": capscale.SiteSpec([b.ffn.fc2 for b in model.blocks], "input")})\n'
        "or, from the command line: capscale measure … --site pre=blocks.{layer}.ffn.fc1 "
        "--site post=blocks.{layer}.ffn.fc2:input"
    )


def _match(model: nn.Module, regex: str) -> dict[int, list[tuple[str, nn.Module]]]:
    rx = re.compile(_ANY_PREFIX + regex)
    found: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules():
        m = rx.fullmatch(name)
        if m:
            found.setdefault(int(m.group(1)), []).append((name, module))
    return found


def _pattern_regex(pattern: str) -> str:
    if pattern.count("{layer}") != 1:
        raise ValueError(f"site pattern {pattern!r} must contain '{{layer}}' exactly once, where the layer index goes")
    head, tail = pattern.split("{layer}")
    return re.escape(head) + r"(\d+)" + re.escape(tail)


def _resolve_modules(model: nn.Module, site: str, spec: SiteSpec) -> dict[int, list[tuple[str, nn.Module]]]:
    mods = spec.modules
    if isinstance(mods, str):
        return _match(model, _pattern_regex(mods))
    if isinstance(mods, nn.Module):
        mods = [mods]
    if isinstance(mods, Mapping):
        items = [(int(k), v) for k, v in mods.items()]
    elif isinstance(mods, Iterable):
        items = list(enumerate(mods))
    else:
        raise TypeError(f"site {site!r}: expected a name pattern or modules, got {type(mods).__name__}")
    names = {id(m): n for n, m in model.named_modules()}
    out: dict[int, list[tuple[str, nn.Module]]] = {}
    for layer, m in items:
        if not isinstance(m, nn.Module):
            raise TypeError(f"site {site!r} layer {layer}: expected an nn.Module, got {type(m).__name__}")
        if id(m) not in names:
            raise SiteDiscoveryError(f"site {site!r} layer {layer}: {type(m).__name__} is not a submodule of the model")
        out[layer] = [(names[id(m)], m)]
    return out


def _as_spec(site: str, value: Any) -> SiteSpec:
    if isinstance(value, SiteSpec):
        return value
    if isinstance(value, tuple) and len(value) == 2 and value[1] in CAPTURES:
        return SiteSpec(value[0], value[1])
    return SiteSpec(value, DEFAULT_CAPTURE[site])


def _check_site_names(names: Iterable[str]) -> None:
    for s in names:
        if s not in SITE_NAMES:
            raise ValueError(f"unknown site {s!r}: sites are {SITE_NAMES}")


def _refuse_container(site: str, name: str, module: nn.Module) -> None:
    """A module holding an FFN (``layers.{layer}.mlp``) is not a site: its input/output is the residual stream."""
    if _in_out(module) is not None or not any(True for _ in module.children()):
        return
    ffn = _find_ffn(module)
    # Attention's square q/o pair is no FFN; a square pair elsewhere (an FFN with I = H) is.
    if isinstance(ffn, str):
        holds = ffn.startswith(("ambiguous", "gated")) and not _ATTENTION_NAME.search(name)
    else:
        square = _in_out(ffn.post[1])[0] == _in_out(ffn.post[1])[1]
        holds = not (square and _ATTENTION_NAME.search(name))
    if holds or any(_experts_layout(m) for m in module.modules()):
        raise SiteDiscoveryError(
            f"site {site!r}: {name} ({type(module).__name__}) is a container holding the FFN; its "
            "input/output is the residual stream, not the FFN's activations. Name the projection "
            "inside it (its output for 'pre', the down projection's input for 'post')"
        )


def _refuse_axisless(site: str, name: str, module: nn.Module, model: nn.Module) -> None:
    """A weightless module (an activation) beside channels-first convolutions: its feature axis cannot be told."""
    if _in_out(module) is not None or any(True for _ in module.children()):
        return
    parts = name.split(".")
    for k in (1, 2):  # its parent and grandparent
        if len(parts) <= k:
            break
        parent = model.get_submodule(".".join(parts[:-k]))
        convs = [(n, m) for n, m in parent.named_modules() if _channels_first(m)]
        if convs:
            n, m = convs[0]
            raise SiteDiscoveryError(
                f"site {site!r}: cannot tell the feature axis of {name} ({type(module).__name__}, no weight): "
                f"it sits beside {type(m).__name__} {'.'.join(parts[:-k])}.{n} ({m.in_channels} -> "
                f"{m.out_channels} channels, channels-first), so its tensor may be [B, C, T] or [B, T, C]. "
                "Name the convolution itself (its output for 'pre', the contracting one's input for 'post')"
            )


def discover(model: nn.Module, sites: Any = SITE_NAMES, layers: Any = "auto") -> Discovery:
    """Resolve ``sites`` (names for auto-discovery, or ``{name: spec}``) and ``layers`` to a :class:`Discovery`.

    ``layers``: ``"auto"`` (every layer found) or an iterable of layer indices
    (negative counts from the last layer), applied to each stack. Sites are
    sorted by (stack, layer, site).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(sites, str):
        sites = (sites,)
    if isinstance(sites, Mapping):
        _check_site_names(sites)
        found = {s: _resolve_modules(model, s, _as_spec(s, v)) for s, v in sites.items()}
        captures = {s: _as_spec(s, v).capture for s, v in sites.items()}
        for s, f in found.items():
            if not f:
                raise SiteDiscoveryError(f"site {s!r}: {sites[s]!r} matched no module of {type(model).__name__}")
            for mods in f.values():
                for n, m in mods:
                    _refuse_container(s, n, m)
                    _refuse_axisless(s, n, m, model)
        return _from_named(model, found, captures, "the given site patterns", layers)
    names = tuple(sites)
    if not names:
        raise ValueError("sites is empty: ask for 'pre', 'post' or both")
    _check_site_names(names)
    for arch in ARCHITECTURES:
        f = {s: _match(model, arch.pattern(s)) for s in names}
        if all(f.values()):
            return _from_named(model, f, {s: arch.capture(s) for s in names}, arch.name, layers)
    found = _structural(model)
    keep = [s for s in found.sites if s.site in names]
    # Layers are counted per stack of blocks (a shared expert belongs to its block's stack).
    outer = {s.stack: s.stack.split("/")[0] if s.stack != SHARED_EXPERT else "" for s in [*keep, *found.skipped]}
    by_stack: dict[str, set[int]] = {}
    for s in [*keep, *found.skipped]:
        by_stack.setdefault(outer[s.stack], set()).add(s.layer)
    chosen = {st: set(_select_layers(sorted(ls), layers)) for st, ls in by_stack.items()}
    keep = [s for s in keep if s.layer in chosen[outer[s.stack]]]
    skipped = [sk for sk in found.skipped if sk.layer in chosen[outer[sk.stack]]]
    order = {st: k for k, st in enumerate(dict.fromkeys(s.stack for s in found.sites))}
    keep.sort(key=lambda s: (order[s.stack], s.layer, SITE_NAMES.index(s.site)))
    if not keep:
        raise SiteDiscoveryError(
            f"none of the chosen layers of {type(model).__name__} has a measurable FFN: "
            + "; ".join(str(sk) for sk in skipped)
        )
    return Discovery(keep, skipped, found.source)


def _from_named(model, found, captures, source, layers) -> Discovery:
    for s, f in found.items():
        for layer, mods in f.items():
            if len(mods) > 1:
                raise SiteDiscoveryError(
                    f"site {s!r} layer {layer} is ambiguous in {type(model).__name__}: "
                    f"{[n for n, _ in mods]} all match ({source}); name the sites explicitly"
                )
    all_layers = sorted(set().union(*(f.keys() for f in found.values())))
    for s, f in found.items():
        missing = sorted(set(all_layers) - set(f))
        if missing:
            raise SiteDiscoveryError(f"site {s!r} not found for layers {missing} ({source})")
    chosen = _select_layers(all_layers, layers)
    sites = [
        Site(layer, s, found[s][layer][0][0], found[s][layer][0][1], captures[s])
        for layer in chosen
        for s in SITE_NAMES
        if s in found
    ]
    return Discovery(sites, [], source)


def discover_sites(model: nn.Module, sites: Any = SITE_NAMES, layers: Any = "auto") -> list[Site]:
    """The sites of :func:`discover` (blocks it could not measure are in ``discover(...).skipped``)."""
    return discover(model, sites, layers).sites


def _select_layers(available: Sequence[int], layers: Any) -> list[int]:
    if isinstance(layers, str):
        if layers != "auto":
            raise ValueError(f"layers must be 'auto' or layer indices, got {layers!r}")
        return list(available)
    if isinstance(layers, int):
        layers = [layers]
    out = []
    for raw in layers:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise TypeError(f"layer indices must be ints, got {raw!r}")
        layer = available[raw] if raw < 0 and -raw <= len(available) else raw
        if layer not in available:
            raise SiteDiscoveryError(f"layer {raw} not found; the model has layers {list(available)}")
        if layer not in out:
            out.append(layer)
    if not out:
        raise ValueError("layers is empty")
    return sorted(out)
