"""Optimizers by name: ``build_optimizer("muon", model, lr=0.01)``.

Each name gives one :class:`HybridOptimizer`: a ``torch.optim.Optimizer`` whose
parameter groups each carry an update ``rule``. The hidden 2-D matrices of the
blocks (``model.param_groups()["matrix"]``) get the named rule; embeddings and
the head get AdamW without weight decay. The paper runs them on Lion/AdamW; we
pick AdamW with the AdamW baseline's defaults, so that runs differ only in how
the hidden matrices are updated.

Every group carries ``base_lr``; the training loop sets
``group["lr"] = group["base_lr"] * schedule_factor`` before each step. State is
tensors and plain numbers only, so ``state_dict()`` round-trips through
``torch.save`` / ``torch.load(weights_only=True)`` and resumes bit-identically.

Rules (paper hyperparameters as defaults, docs/conventions.md):

* ``adamw``   — decoupled weight decay; the arithmetic of ``torch.optim.AdamW``.
* ``muon``    — Nesterov momentum → Newton–Schulz orthogonalisation (fp32 on CPU,
  bf16 allowed on CUDA) → step scaled by √max(1, rows/cols) (Keller Jordan's Muon,
  the same as ``torch.optim.Muon``'s default).
* ``normuon`` — Muon, then each row (output neuron) of the orthogonalised update is
  divided by the root of an EMA of its mean square, and the whole update is
  rescaled to the orthogonalised update's Frobenius norm (Li et al. 2025).
* ``dion``    — low-rank orthonormal update by one power iteration with QR, error
  feedback into the momentum, column-normalised right factor (Ahn et al. 2025,
  Algorithm 1); scaled like Muon so that at full rank it takes Muon's step.
* ``shampoo`` — Kronecker-factored preconditioner L^-1/4 · M · R^-1/4 of the
  momentum, per tile of at most ``block_size``², roots by ``eigh`` in float64 every
  ``precondition_every`` steps, grafted to AdamW's (or SGD's) per-matrix update norm (Gupta et al. 2018;
  grafting as in Anil et al. 2020). Our own: the maintained packages did not fit
  (see :class:`ShampooConfig`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

# Newton–Schulz quintic coefficients (Keller Jordan's Muon; also torch.optim.Muon's)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7
NS_DTYPES = ("auto", "float32", "bfloat16")
GRAFTS = ("adamw", "sgd", "none")
ROLES = ("matrix", "embed", "head")


# --------------------------------------------------------------------------- numerics


def newton_schulz(G: Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> Tensor:
    """Approximate orthogonalisation U·S'·Vᵀ ≈ U·Vᵀ of a 2-D ``G`` (S' ∈ ~[0.7, 1.2]).

    Quintic Newton–Schulz iteration computed in ``dtype`` (fp32 on CPU, where bf16
    matmul is ~100× slower; bf16 is fine on CUDA); returned in ``G``'s dtype.
    """
    if G.dim() != 2:
        raise ValueError(f"newton_schulz needs a 2-D matrix, got shape {tuple(G.shape)}")
    a, b, c = NS_COEFFICIENTS
    X = G.to(dtype)
    wide = G.size(0) > G.size(1)
    if wide:  # iterate on the short side: X Xᵀ is the smaller Gram matrix
        X = X.T
    X = X.div(X.norm().clamp(min=NS_EPS))  # Frobenius ≥ spectral norm, so σ ≤ 1
    for _ in range(steps):
        A = X @ X.T
        B = torch.addmm(A, A, A, beta=b, alpha=c)  # b·A + c·A²
        X = torch.addmm(X, B, X, beta=a)  # a·X + B·X
    return (X.T if wide else X).to(G.dtype)


def muon_scale(shape: torch.Size | tuple[int, ...]) -> float:
    """Muon's shape factor √max(1, rows/cols): equal per-entry update RMS across shapes."""
    rows, cols = shape[0], shape[1]
    return math.sqrt(max(1.0, rows / cols))


def inverse_root(S: Tensor, root: int, eps: float) -> Tensor:
    """``(S + eps·λ_max·I)^(-1/root)`` of a symmetric PSD ``S``, via float64 ``eigh``.

    The regulariser is relative to λ_max, so the result's shape does not depend
    on the gradient's scale. An all-zero ``S`` (no signal yet) gives the identity.
    """
    S64 = S.double()
    if not bool(torch.isfinite(S64).all()):
        raise FloatingPointError("Shampoo statistics are not finite: the run has diverged")
    S64 = (S64 + S64.T) / 2  # remove round-off asymmetry before eigh
    lam, V = torch.linalg.eigh(S64)
    top = float(lam[-1])
    if not top > 0.0:
        return torch.eye(S.size(0), dtype=S.dtype, device=S.device)
    lam = lam.clamp(min=0.0) + eps * top
    return ((V * lam.pow(-1.0 / root)) @ V.T).to(S.dtype)


# --------------------------------------------------------------------------- update rules
# Each rule updates every parameter of one group that has a gradient, in place.


def _adamw_rule(opt: Optimizer, group: dict) -> None:
    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
    beta1, beta2 = group["betas"]
    for p in group["params"]:
        if p.grad is None:
            continue
        g, state = p.grad, opt.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        t = state["step"]
        # same operation order as torch.optim.AdamW (single-tensor path)
        p.mul_(1 - lr * wd)
        state["exp_avg"].lerp_(g, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step_size = lr / (1 - beta1**t)
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
        p.addcdiv_(state["exp_avg"], denom, value=-step_size)


def _ns_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def _muon_momentum(opt: Optimizer, p: Tensor, group: dict) -> tuple[dict, Tensor]:
    """Update p's momentum buffer; return (state, Nesterov-or-plain momentum direction)."""
    state, g, mu = opt.state[p], p.grad, group["momentum"]
    if "momentum_buffer" not in state:
        state["momentum_buffer"] = torch.zeros_like(p)
    buf = state["momentum_buffer"]
    buf.lerp_(g, 1 - mu)
    return state, (g.lerp(buf, mu) if group["nesterov"] else buf)


def _muon_rule(opt: Optimizer, group: dict) -> None:
    lr, wd = group["lr"], group["weight_decay"]
    for p in group["params"]:
        if p.grad is None:
            continue
        _, direction = _muon_momentum(opt, p, group)
        update = newton_schulz(direction, group["ns_steps"], _ns_dtype(group["ns_dtype"], p.device))
        p.mul_(1 - lr * wd)
        p.add_(update, alpha=-lr * muon_scale(p.shape))


def _normuon_rule(opt: Optimizer, group: dict) -> None:
    lr, wd, beta2 = group["lr"], group["weight_decay"], group["beta2"]
    for p in group["params"]:
        if p.grad is None:
            continue
        state, direction = _muon_momentum(opt, p, group)
        ortho = newton_schulz(direction, group["ns_steps"], _ns_dtype(group["ns_dtype"], p.device)).float()
        if "second_momentum" not in state:
            state["second_momentum"] = torch.zeros_like(p[:, :1])  # one per row (neuron)
        v = state["second_momentum"]
        frob = ortho.norm()
        v.lerp_(ortho.square().mean(dim=1, keepdim=True).to(v.dtype), 1 - beta2)
        ortho.div_(v.float().sqrt().add_(1e-10))
        # keep the orthogonalised update's Frobenius norm: only its row balance changes
        ortho.mul_(frob / ortho.norm().add_(1e-10))
        p.mul_(1 - lr * wd)
        p.add_(ortho.to(p.dtype), alpha=-lr * muon_scale(p.shape))


def dion_rank(shape: torch.Size | tuple[int, ...], rank_fraction: float) -> int:
    """Dion's rank r = ⌈rank_fraction · min(rows, cols)⌉ (at least 1)."""
    return max(1, math.ceil(rank_fraction * min(shape[0], shape[1])))


def _dion_rule(opt: Optimizer, group: dict) -> None:
    lr, wd, mu, eps = group["lr"], group["weight_decay"], group["momentum"], group["eps"]
    for i, p in enumerate(group["params"]):
        if p.grad is None:
            continue
        state = opt.state[p]
        if not state:
            state["momentum"] = torch.zeros_like(p)
            # Seeded right factor: a run (and its resume) does not depend on global RNG
            gen = torch.Generator().manual_seed(group["seed"] * 1_000_003 + i)
            r = dion_rank(p.shape, group["rank_fraction"])
            state["Q"] = torch.randn(min(p.shape), r, generator=gen, dtype=p.dtype).to(p.device)
        M, Q = state["momentum"], state["Q"]
        M.add_(p.grad)  # B = M + G, in place
        tall = p.size(0) >= p.size(1)
        B = M if tall else M.T  # [long side, short side]; a view, so edits reach M
        P = torch.linalg.qr((B @ Q).float()).Q.to(B.dtype)  # [long, r], orthonormal columns
        R = B.T @ P  # [short, r]
        p.mul_(1 - lr * wd)
        if not bool(R.any()):  # zero momentum (e.g. a zero-initialised layer): keep Q
            continue
        B.sub_(P @ R.T, alpha=1 - mu)  # error feedback: M = B − (1−μ)·P·Rᵀ
        Q.copy_(R / R.norm(dim=0, keepdim=True).add_(eps))  # column normalisation
        update = P @ Q.T
        p.add_(update if tall else update.T, alpha=-lr * muon_scale(p.shape))


def shampoo_tiles(shape: torch.Size | tuple[int, ...], block_size: int) -> list[tuple[slice, slice]]:
    """Row-major tiles of at most ``block_size`` × ``block_size`` covering a matrix.

    Each tile gets its own Kronecker factors (blocked Shampoo, as in Anil et al.
    2020 and Shi et al. 2023), which bounds the factor size and the ``eigh`` cost.
    """
    rows, cols = shape[0], shape[1]
    return [
        (slice(r, min(r + block_size, rows)), slice(c, min(c + block_size, cols)))
        for r in range(0, rows, block_size)
        for c in range(0, cols, block_size)
    ]


def _shampoo_rule(opt: Optimizer, group: dict) -> None:
    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
    beta1, beta2 = group["betas"]
    for p in group["params"]:
        if p.grad is None:
            continue
        g, state = p.grad, opt.state[p]
        tiles = shampoo_tiles(p.shape, group["block_size"])
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
            for k, (rs, cs) in enumerate(tiles):
                for side, n in (("L", rs.stop - rs.start), ("R", cs.stop - cs.start)):
                    state[f"{side}{k}"] = torch.zeros(n, n, dtype=p.dtype, device=p.device)
                    state[f"{side}root{k}"] = torch.eye(n, dtype=p.dtype, device=p.device)
        state["step"] += 1
        t = state["step"]
        state["exp_avg"].lerp_(g, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
        refresh = (t - 1) % group["precondition_every"] == 0
        m_hat = state["exp_avg"] / (1 - beta1**t)
        update = torch.empty_like(m_hat)
        for k, (rs, cs) in enumerate(tiles):
            gk = g[rs, cs]
            state[f"L{k}"].mul_(beta2).addmm_(gk, gk.T, alpha=1 - beta2)  # L ← β L + (1−β) G Gᵀ
            state[f"R{k}"].mul_(beta2).addmm_(gk.T, gk, alpha=1 - beta2)  # R ← β R + (1−β) Gᵀ G
            if refresh:
                for side in ("L", "R"):
                    state[f"{side}root{k}"].copy_(inverse_root(state[f"{side}{k}"], 4, group["matrix_eps"]))
            update[rs, cs] = state[f"Lroot{k}"] @ m_hat[rs, cs] @ state[f"Rroot{k}"]
        if group["graft"] != "none":
            # grafting: Shampoo's direction with AdamW's (or SGD's) step length per matrix
            if group["graft"] == "adamw":
                graft = m_hat / (state["exp_avg_sq"] / (1 - beta2**t)).sqrt().add_(eps)
            else:
                graft = m_hat
            update.mul_(graft.norm() / update.norm().clamp(min=1e-30))
        p.mul_(1 - lr * wd)
        p.add_(update, alpha=-lr)


RULES: dict[str, Callable[[Optimizer, dict], None]] = {
    "adamw": _adamw_rule,
    "muon": _muon_rule,
    "normuon": _normuon_rule,
    "dion": _dion_rule,
    "shampoo": _shampoo_rule,
}
_MATRIX_RULES = ("muon", "normuon", "dion", "shampoo")
_RULE_KEYS = {
    "adamw": ("betas", "eps", "weight_decay"),
    "muon": ("momentum", "nesterov", "weight_decay", "ns_steps", "ns_dtype"),
    "normuon": ("momentum", "nesterov", "weight_decay", "ns_steps", "ns_dtype", "beta2"),
    "dion": ("momentum", "weight_decay", "rank_fraction", "eps", "seed"),
    "shampoo": ("betas", "eps", "weight_decay", "precondition_every", "matrix_eps", "block_size", "graft"),
}


class HybridOptimizer(Optimizer):
    """One optimizer whose parameter groups each follow their own update ``rule``.

    Each group is a dict with ``params``, ``rule`` (a key of :data:`RULES`),
    ``lr``, ``base_lr`` and the rule's hyperparameters; usually built by
    :func:`build_optimizer`.
    """

    def __init__(self, param_groups: list[dict[str, Any]]):
        for group in param_groups:
            rule = group.get("rule")
            if rule not in RULES:
                raise ValueError(f"param group rule must be one of {sorted(RULES)}, got {rule!r}")
            missing = [k for k in ("lr", "base_lr", *_RULE_KEYS[rule]) if k not in group]
            if missing:
                raise ValueError(f"param group with rule {rule!r} lacks {missing}")
            if rule in _MATRIX_RULES:
                for p in group["params"]:
                    if p.dim() != 2:
                        raise ValueError(
                            f"rule {rule!r} updates 2-D matrices only, got a parameter of "
                            f"shape {tuple(p.shape)}; put it in an 'adamw' group"
                        )
        super().__init__(param_groups, defaults={})

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            RULES[group["rule"]](self, group)
        return loss


# --------------------------------------------------------------------------- configs


def _check_number(
    cls: str, name: str, value: Any, lo: float, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ValueError(f"{cls}.{name} must be a number in {interval}, got {value!r}")


def _check_int(cls: str, name: str, value: Any, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{cls}.{name} must be an int ≥ {lo}, got {value!r}")


def _check_betas(cls: str, obj: Any, name: str) -> None:
    betas = getattr(obj, name)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{cls}.{name} must be a pair (beta1, beta2), got {betas!r}")
    for b in betas:
        _check_number(cls, name, b, 0.0, 1.0, hi_open=True)
    object.__setattr__(obj, name, (float(betas[0]), float(betas[1])))  # lists from TOML/JSON


def _adamw_group(params: list, role: str, lr: float, betas: tuple, eps: float, wd: float) -> dict:
    return {
        "params": params,
        "role": role,
        "rule": "adamw",
        "lr": lr,
        "base_lr": lr,
        "betas": betas,
        "eps": eps,
        "weight_decay": wd,
    }


@dataclass(frozen=True)
class AdamWConfig:
    """AdamW everywhere; weight decay on the hidden matrices only (paper)."""

    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.01

    def __post_init__(self) -> None:
        name = type(self).__name__
        _check_number(name, "lr", self.lr, 0.0, lo_open=True)
        _check_betas(name, self, "betas")
        _check_number(name, "eps", self.eps, 0.0, lo_open=True)
        _check_number(name, "weight_decay", self.weight_decay, 0.0)

    def param_groups(self, roles: dict[str, list]) -> list[dict]:
        return [
            _adamw_group(roles[r], r, self.lr, self.betas, self.eps, self.weight_decay if r == "matrix" else 0.0)
            for r in ROLES
        ]


@dataclass(frozen=True)
class _MatrixConfig(ABC):
    """Shared: a matrix rule on the hidden matrices, AdamW (no decay) on embed/head."""

    adamw_lr: float = 3e-3
    adamw_betas: tuple[float, float] = (0.9, 0.95)
    adamw_eps: float = 1e-8

    def _check_adamw(self) -> None:
        name = type(self).__name__
        _check_number(name, "adamw_lr", self.adamw_lr, 0.0, lo_open=True)
        _check_betas(name, self, "adamw_betas")
        _check_number(name, "adamw_eps", self.adamw_eps, 0.0, lo_open=True)

    @abstractmethod
    def _matrix_group(self) -> dict:
        """The matrix group's rule and its hyperparameters."""

    def param_groups(self, roles: dict[str, list]) -> list[dict]:
        matrix = {"params": roles["matrix"], "role": "matrix", "base_lr": self.lr, **self._matrix_group()}
        matrix["lr"] = self.lr
        return [matrix] + [
            _adamw_group(roles[r], r, self.adamw_lr, self.adamw_betas, self.adamw_eps, 0.0) for r in ("embed", "head")
        ]


@dataclass(frozen=True)
class MuonConfig(_MatrixConfig):
    lr: float = 0.02
    momentum: float = 0.95
    nesterov: bool = True
    weight_decay: float = 0.01
    ns_steps: int = 5
    ns_dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA

    def __post_init__(self) -> None:
        name = type(self).__name__
        _check_number(name, "lr", self.lr, 0.0, lo_open=True)
        _check_number(name, "momentum", self.momentum, 0.0, 1.0, hi_open=True)
        if not isinstance(self.nesterov, bool):
            raise ValueError(f"{name}.nesterov must be a bool, got {self.nesterov!r}")
        _check_number(name, "weight_decay", self.weight_decay, 0.0)
        _check_int(name, "ns_steps", self.ns_steps, 1)
        if self.ns_dtype not in NS_DTYPES:
            raise ValueError(f"{name}.ns_dtype must be one of {NS_DTYPES}, got {self.ns_dtype!r}")
        self._check_adamw()

    def _matrix_group(self) -> dict:
        return {
            "rule": "muon",
            "momentum": self.momentum,
            "nesterov": self.nesterov,
            "weight_decay": self.weight_decay,
            "ns_steps": self.ns_steps,
            "ns_dtype": self.ns_dtype,
        }


@dataclass(frozen=True)
class NorMuonConfig(MuonConfig):
    beta2: float = 0.95

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_number(type(self).__name__, "beta2", self.beta2, 0.0, 1.0, hi_open=True)

    def _matrix_group(self) -> dict:
        return {**super()._matrix_group(), "rule": "normuon", "beta2": self.beta2}


@dataclass(frozen=True)
class DionConfig(_MatrixConfig):
    lr: float = 0.02
    momentum: float = 0.95  # Dion's μ
    weight_decay: float = 0.01
    rank_fraction: float = 0.25  # the paper sweeps 1/2 … 1/16
    eps: float = 1e-8
    seed: int = 0  # seeds the initial right factors Q

    def __post_init__(self) -> None:
        name = type(self).__name__
        _check_number(name, "lr", self.lr, 0.0, lo_open=True)
        _check_number(name, "momentum", self.momentum, 0.0, 1.0, hi_open=True)
        _check_number(name, "weight_decay", self.weight_decay, 0.0)
        _check_number(name, "rank_fraction", self.rank_fraction, 0.0, 1.0, lo_open=True)
        _check_number(name, "eps", self.eps, 0.0, lo_open=True)
        _check_int(name, "seed", self.seed, 0)
        self._check_adamw()

    def _matrix_group(self) -> dict:
        return {
            "rule": "dion",
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "rank_fraction": self.rank_fraction,
            "eps": self.eps,
            "seed": self.seed,
        }


@dataclass(frozen=True)
class ShampooConfig(_MatrixConfig):
    """Our own Shampoo. Checked first (torch 2.13, CPU): pytorch-optimizer 4.1.0's
    ``ScalableShampoo`` keeps Python objects in its state (not loadable with
    ``torch.load(weights_only=True)``, so no safe exact resume) and its ``Shampoo``
    overwrites ``p.grad`` and has no grafting; heavyball 3.2.1 ships only KL-Shampoo
    (a different method) and is built around ``torch.compile``; Meta's
    distributed Shampoo is not on PyPI.

    ``lr`` is AdamW's: grafting gives each matrix AdamW's update norm
    (``graft="none"``: plain Shampoo). ``matrix_eps`` regularises each factor
    relative to its largest eigenvalue. Matrices are tiled into blocks of at most
    ``block_size`` per side, each with its own factors: a 2048-wide FFN side costs
    four 512² ``eigh`` instead of one 2048² (16× less), which keeps the CPU study's
    widest runs affordable; raise it on a GPU for fewer, larger blocks.
    """

    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.01
    precondition_every: int = 10
    matrix_eps: float = 1e-6
    block_size: int = 512
    graft: str = "adamw"

    def __post_init__(self) -> None:
        name = type(self).__name__
        _check_number(name, "lr", self.lr, 0.0, lo_open=True)
        _check_betas(name, self, "betas")
        _check_number(name, "eps", self.eps, 0.0, lo_open=True)
        _check_number(name, "weight_decay", self.weight_decay, 0.0)
        _check_int(name, "precondition_every", self.precondition_every, 1)
        _check_number(name, "matrix_eps", self.matrix_eps, 0.0, lo_open=True)
        _check_int(name, "block_size", self.block_size, 1)
        if self.graft not in GRAFTS:
            raise ValueError(f"{name}.graft must be one of {GRAFTS}, got {self.graft!r}")
        self._check_adamw()

    def _matrix_group(self) -> dict:
        return {
            "rule": "shampoo",
            "betas": self.betas,
            "eps": self.eps,
            "weight_decay": self.weight_decay,
            "precondition_every": self.precondition_every,
            "matrix_eps": self.matrix_eps,
            "block_size": self.block_size,
            "graft": self.graft,
        }


OPTIMIZERS: dict[str, type] = {
    "adamw": AdamWConfig,
    "muon": MuonConfig,
    "normuon": NorMuonConfig,
    "dion": DionConfig,
    "shampoo": ShampooConfig,
}


def optimizer_config(name: str, **overrides: Any):
    """The resolved hyperparameters of optimizer ``name`` (a frozen dataclass)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid: {sorted(OPTIMIZERS)}")
    cls = OPTIMIZERS[name]
    valid = sorted(f.name for f in fields(cls))
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"unknown hyperparameter(s) {unknown} for optimizer {name!r}; valid: {valid}")
    return cls(**overrides)


def optimizer_defaults(name: str) -> dict[str, Any]:
    """Default hyperparameters of optimizer ``name`` as a plain dict."""
    return asdict(optimizer_config(name))


def build_optimizer(name: str, model: nn.Module, **overrides: Any) -> HybridOptimizer:
    """Optimizer ``name`` for ``model`` (which must provide ``param_groups()`` with the
    roles "matrix", "embed" and "head", as :class:`capscale.train.model.GPT` does)."""
    config = optimizer_config(name, **overrides)
    if not callable(getattr(model, "param_groups", None)):
        raise TypeError(
            f"{type(model).__name__} has no param_groups(); build_optimizer needs a model "
            "that sorts its parameters into 'matrix', 'embed' and 'head'"
        )
    roles = model.param_groups()
    if set(roles) != set(ROLES):
        raise ValueError(f"model.param_groups() must have keys {ROLES}, got {sorted(roles)}")
    groups = [g for g in config.param_groups(roles) if g["params"]]
    return HybridOptimizer(groups)
