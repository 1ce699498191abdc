"""The paper's GPT: a modded-nanoGPT-style decoder, readable in one sitting.

RoPE, QK RMSNorm, ReLU² FFN, parameter-free pre-LN RMSNorm, no biases, untied
``lm_head`` (docs/conventions.md, "The paper's training setup"), with switches for the
architecture interventions the experiments vary: FFN width, activation,
positional encoding, heads, depth, d_model.

Module names are a contract with the telemetry probe, which finds its sites by
name: ``blocks.{i}.mlp.c_fc`` (d_model → width; the *gate* for SwiGLU),
``blocks.{i}.mlp.c_up`` (SwiGLU only) and ``blocks.{i}.mlp.c_proj``
(width → d_model). FFN pre-activation = output of ``c_fc``; post-activation =
input of ``c_proj`` (for SwiGLU: act(gate) ⊙ up).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS = ("relu2", "gelu", "swiglu")
POSITIONS = ("rope", "learned", "none")
DEFAULT_FFN_MULT = 4  # modded-nanoGPT's (and GPT-2's) FFN expansion


def _check_int(name: str, value: Any, minimum: int = 1) -> None:
    # bool is an int subclass; reject it (and floats like 128.0) explicitly
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"GPTConfig.{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"GPTConfig.{name} must be ≥ {minimum}, got {value}")


@dataclass(frozen=True)
class GPTConfig:
    """Model shape and architecture switches.

    The FFN width is given by exactly one of ``ffn_width`` (absolute) or
    ``ffn_mult`` (× d_model, rounded); with neither, ``4 · d_model``. For SwiGLU
    the width is that of the gate and up projections (no 2/3 rescaling).
    """

    vocab_size: int = 50304
    seq_len: int = 1024
    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    ffn_width: int | None = None
    ffn_mult: float | None = None
    activation: str = "relu2"
    pos: str = "rope"
    qk_norm: bool = True
    rope_base: float = 10000.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "n_layer", "n_head", "d_model"):
            _check_int(name, getattr(self, name))
        if self.d_model % self.n_head:
            raise ValueError(f"GPTConfig: d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"GPTConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.pos not in POSITIONS:
            raise ValueError(f"GPTConfig.pos must be one of {POSITIONS}, got {self.pos!r}")
        if self.pos == "rope" and self.head_dim % 2:
            raise ValueError(f"GPTConfig: RoPE needs an even head dim, got d_model/n_head = {self.head_dim}")
        if not isinstance(self.qk_norm, bool):
            raise ValueError(f"GPTConfig.qk_norm must be a bool, got {self.qk_norm!r}")
        if not (isinstance(self.rope_base, (int, float)) and self.rope_base > 1):
            raise ValueError(f"GPTConfig.rope_base must be a number > 1, got {self.rope_base!r}")
        if self.ffn_width is not None and self.ffn_mult is not None:
            raise ValueError(
                "GPTConfig: give ffn_width (absolute) or ffn_mult (× d_model), not both "
                f"(got ffn_width={self.ffn_width}, ffn_mult={self.ffn_mult})"
            )
        if self.ffn_width is not None and (isinstance(self.ffn_width, bool) or not isinstance(self.ffn_width, int)):
            raise ValueError(f"GPTConfig.ffn_width must be an int, got {self.ffn_width!r}")
        if self.ffn_mult is not None:
            if isinstance(self.ffn_mult, bool) or not isinstance(self.ffn_mult, (int, float)):
                raise ValueError(f"GPTConfig.ffn_mult must be a number, got {self.ffn_mult!r}")
            if not math.isfinite(self.ffn_mult):
                raise ValueError(f"GPTConfig.ffn_mult must be finite, got {self.ffn_mult!r}")
        if self.ffn_dim < 1:
            raise ValueError(
                f"GPTConfig: FFN width must be ≥ 1, got {self.ffn_dim} "
                f"(ffn_width={self.ffn_width}, ffn_mult={self.ffn_mult}, d_model={self.d_model})"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def ffn_dim(self) -> int:
        """The resolved FFN width."""
        if self.ffn_width is not None:
            return self.ffn_width
        mult = DEFAULT_FFN_MULT if self.ffn_mult is None else self.ffn_mult
        return round(mult * self.d_model)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - valid)
        if unknown:
            raise ValueError(f"unknown GPTConfig key(s) {unknown}; valid keys: {sorted(valid)}")
        return cls(**d)


def rms_norm(x: Tensor) -> Tensor:
    """Parameter-free RMSNorm over the last dim."""
    return F.rms_norm(x, (x.size(-1),))


class Rotary(nn.Module):
    """Rotary position embedding (RoPE), half-split convention."""

    def __init__(self, head_dim: int, max_len: int, base: float):
        super().__init__()
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
        # non-persistent: derived from the config, so not in checkpoints
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:  # x: [B, H, S, hd]
        S = x.size(-2)
        cos, sin = self.cos[:S].to(x.dtype), self.sin[:S].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim, self.qk_norm = cfg.n_head, cfg.head_dim, cfg.qk_norm
        d = cfg.d_model
        # separate q/k/v matrices: matrix optimizers (Muon, Dion, …) treat each on its own
        self.c_q = nn.Linear(d, d, bias=False)
        self.c_k = nn.Linear(d, d, bias=False)
        self.c_v = nn.Linear(d, d, bias=False)
        self.c_proj = nn.Linear(d, d, bias=False)
        self.rotary = Rotary(cfg.head_dim, cfg.seq_len, cfg.rope_base) if cfg.pos == "rope" else None

    def forward(self, x: Tensor) -> Tensor:
        B, S, D = x.shape
        q, k, v = (
            lin(x).view(B, S, self.n_head, self.head_dim).transpose(1, 2) for lin in (self.c_q, self.c_k, self.c_v)
        )
        if self.qk_norm:  # bounds attention logits; modded-nanoGPT's stabiliser
            q, k = rms_norm(q), rms_norm(k)
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, S, D))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.activation = cfg.activation
        self.c_fc = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)  # SwiGLU: the gate
        self.c_up = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False) if cfg.activation == "swiglu" else None
        self.c_proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.c_fc(x)  # pre-activation site
        if self.activation == "relu2":
            h = F.relu(h).square()
        elif self.activation == "gelu":
            h = F.gelu(h)
        else:  # swiglu
            h = F.silu(h) * self.c_up(x)
        return self.c_proj(h)  # its input is the post-activation site


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn = CausalSelfAttention(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(rms_norm(x))
        return x + self.mlp(rms_norm(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if not isinstance(cfg, GPTConfig):
            raise TypeError(f"GPT expects a GPTConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model) if cfg.pos == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)  # untied
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
        # Zero-init the residual-branch outputs (as modded-nanoGPT does): every block
        # starts as the identity, so the initial net is embedding → head and the
        # residual stream's scale does not grow with depth (no 1/√(2L) fix-up needed).
        for block in self.blocks:
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()

    def forward(self, idx: Tensor, targets: Tensor | None = None, reduction: str = "mean"):
        """Logits ``[B, S, V]``; with ``targets``, ``(logits, loss)``.

        ``loss`` is computed in fp32: a scalar for ``reduction="mean"``, per token
        ``[B, S]`` for ``reduction="none"``. Targets equal to -1 are ignored (their
        per-token loss is 0 and they are left out of the mean).
        """
        if idx.dim() != 2:
            raise ValueError(f"idx must be [batch, seq] token ids, got shape {tuple(idx.shape)}")
        B, S = idx.shape
        if S > self.cfg.seq_len:
            raise ValueError(f"sequence length {S} exceeds the model's seq_len {self.cfg.seq_len}")
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(S, device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(rms_norm(x))
        if targets is None:
            return logits
        if targets.shape != idx.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} != idx shape {tuple(idx.shape)}")
        loss = F.cross_entropy(
            logits.float().view(B * S, -1),
            targets.reshape(B * S),
            ignore_index=-1,
            reduction=reduction,
        )
        return logits, (loss if reduction == "mean" else loss.view(B, S))

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count; ``non_embedding`` leaves out tok_emb and pos_emb."""
        skip = {id(p) for p in self.param_groups()["embed"]} if non_embedding else set()
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by role for the optimizers: hidden 2-D "matrix" weights of the
        blocks, "embed" (tok_emb, pos_emb) and "head" (lm_head)."""
        groups: dict[str, list[nn.Parameter]] = {"matrix": [], "embed": [], "head": []}
        for name, p in self.named_parameters():
            if name.startswith("blocks.") and p.dim() == 2:
                groups["matrix"].append(p)
            elif name.startswith(("tok_emb.", "pos_emb.")):
                groups["embed"].append(p)
            elif name.startswith("lm_head."):
                groups["head"].append(p)
            else:  # fail near the source if a new parameter kind is added unclassified
                raise RuntimeError(f"parameter {name!r} has no optimizer role")
        return groups
