"""Where to look: the FFN pre/post-activation sites of a model, found by module name.

A *site* is one tensor per transformer block: ``pre`` (the FFN pre-activation,
e.g. the output of the up / gate projection) or ``post`` (the post-activation,
e.g. the input of the down projection). Known architectures are recognised by
module-name patterns; any other model names its sites explicitly, by pattern
(``"blocks.{layer}.ffn.fc1"``) or by module objects.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

SITE_NAMES = ("pre", "post")
CAPTURES = ("output", "input")
# Which tensor of a named module is the site when the user names only the module.
DEFAULT_CAPTURE = {"pre": "output", "post": "input"}
# Names may carry wrapper prefixes (``module.`` for DDP, ``_orig_mod.`` for
# torch.compile, ``transformer.`` / ``model.`` for HF), so patterns match a suffix.
_ANY_PREFIX = r"(?:.*\.)?"


class SiteDiscoveryError(ValueError):
    """The FFN sites of a model could not be found, or were named ambiguously."""


@dataclass(frozen=True)
class Architecture:
    """A family of models recognised by name: one regex per site, group 1 = layer index."""

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


# Order matters only for the error message; a model matching two families is an error.
ARCHITECTURES = (
    Architecture(
        "TransformerLens",
        r"blocks\.(\d+)\.mlp\.hook_pre",
        r"blocks\.(\d+)\.mlp\.hook_post",
        "output",
        "output",
        example="blocks.{i}.mlp.hook_pre (output) / blocks.{i}.mlp.hook_post (output)",
    ),
    Architecture(
        "capscale GPT / HF GPT-2",
        r"(?:blocks|h)\.(\d+)\.mlp\.c_fc",
        r"(?:blocks|h)\.(\d+)\.mlp\.c_proj",
        example="blocks.{i}.mlp.c_fc or h.{i}.mlp.c_fc (output) / ….mlp.c_proj (input)",
    ),
    Architecture(
        "Llama / Mistral / Qwen gated MLP",
        r"layers\.(\d+)\.mlp\.gate_proj",
        r"layers\.(\d+)\.mlp\.down_proj",
        example="layers.{i}.mlp.gate_proj (output) / layers.{i}.mlp.down_proj (input)",
    ),
)


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


@dataclass(frozen=True, eq=False)
class Site:
    """One resolved site: layer, site name, the module and which of its tensors is captured."""

    layer: int
    site: str
    name: str
    module: nn.Module
    capture: str

    @property
    def label(self) -> str:
        return f"layer {self.layer} site {self.site!r} ({self.name} {self.capture})"

    def feature_dim(self) -> int | None:
        """The site's width from the module's shape where it is knowable without a forward."""
        m = self.module
        if isinstance(m, nn.Linear):
            return m.out_features if self.capture == "output" else m.in_features
        w = getattr(m, "weight", None)
        # HF Conv1D stores weight as [in, out] and exposes nf = out features.
        if type(m).__name__ == "Conv1D" and w is not None and w.dim() == 2:
            return int(w.shape[1] if self.capture == "output" else w.shape[0])
        return None


def _hint() -> str:
    looked = "\n".join(f"  - {a.name}: {a.example}" for a in ARCHITECTURES)
    return (
        f"Looked for:\n{looked}\n"
        "Name the sites explicitly, e.g.\n"
        '  capscale.attach(model, sites={"pre": "blocks.{layer}.ffn.fc1", '
        '"post": ("blocks.{layer}.ffn.fc2", "input")})\n'
        "or with module objects:\n"
        '  capscale.attach(model, sites={"pre": [b.ffn.fc1 for b in model.blocks], '
        '"post": SiteSpec([b.ffn.fc2 for b in model.blocks], "input")})'
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


def discover_sites(model: nn.Module, sites: Any = SITE_NAMES, layers: Any = "auto") -> list[Site]:
    """Resolve ``sites`` (names for auto-discovery, or ``{name: spec}``) and ``layers`` to Sites.

    ``layers``: ``"auto"`` (every layer found) or an iterable of layer indices
    (negative counts from the last layer). Sorted by (layer, site).
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
        source = "the given site patterns"
    else:
        names = tuple(sites)
        if not names:
            raise ValueError("sites is empty: ask for 'pre', 'post' or both")
        _check_site_names(names)
        matches = []
        for arch in ARCHITECTURES:
            f = {s: _match(model, arch.pattern(s)) for s in names}
            if all(f.values()):
                matches.append((arch, f))
        if not matches:
            raise SiteDiscoveryError(
                f"capscale could not find the FFN sites {names} of {type(model).__name__}.\n{_hint()}"
            )
        if len(matches) > 1:
            fams = ", ".join(a.name for a, _ in matches)
            raise SiteDiscoveryError(
                f"{type(model).__name__} matches several architectures ({fams}); name the sites explicitly.\n{_hint()}"
            )
        arch, found = matches[0]
        captures = {s: arch.capture(s) for s in names}
        source = arch.name
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
    return [
        Site(layer, s, found[s][layer][0][0], found[s][layer][0][1], captures[s])
        for layer in chosen
        for s in SITE_NAMES
        if s in found
    ]


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
