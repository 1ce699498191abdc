"""Synthetic sweep directories for the analysis and report tests.

Writes run directories exactly as the run-directory contract says (config.json,
metrics.jsonl, spectra.parquet, status.json under SWEEP/runs/<name>/), with
**planted** power laws: for each series, site and bucket,

    R(width) = anchor · D0 · (width / D0)^β · layer factor · seed noise · step noise

so a test knows the β the analysis must recover. The scalar fields of every
spectra row are consistent with the planted ranks (asymmetry = log(R1/R2),
spectral_entropy = log R1, participation_ratio = R2, R∞ ≤ R2 ≤ R1 ≤ R½ ≤ D,
N/D and sampling_status from ``capscale.spectrum.sampling_status``). The
``eigenvalues`` list is a placeholder of the right length (a geometric decay):
no spectrum of this simple form has both planted ranks, and the analysis never
reads eigenvalues. Tests of the aggregation convention on *real* spectra build
their rows with ``spectrum_summary`` instead (see ``summary_rows``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from capscale.spectrum import BUCKETS, sampling_status, spectrum_summary

ALL_BUCKETS = ("all", *BUCKETS)
BUCKET_SCALE = {"all": 1.0, "head": 0.6, "mid": 0.9, "tail": 0.8}  # anchor factor per bucket
BUCKET_SAMPLES = {"all": 4096, "head": 2048, "mid": 1024, "tail": 512}  # → tail undersampled at large D
BUCKET_LOSS = {"head": -1.0, "mid": 0.0, "tail": 1.5}  # per-bucket val loss offsets
PRE_SCALE, PRE_DBETA = 0.8, -0.05  # pre-activation: smaller ranks, β lower by 0.05


@dataclass(frozen=True)
class Series:
    """One planted series. β per bucket (all/head/mid/tail); anchors are rank/D at the smallest width."""

    label: str
    soft0: float
    hard0: float
    beta_soft: dict[str, float]
    beta_hard: dict[str, float]
    loss0: float  # final val loss at the smallest width
    optimizer: str | None = None  # defaults to label
    steps: int = 60
    seeds: tuple[int, ...] = (0, 1)
    pos: str = "rope"
    params: dict = field(default_factory=dict)

    def beta(self, kind: str, site: str, bucket: str) -> float:
        b = (self.beta_soft if kind == "soft" else self.beta_hard)[bucket]
        return b + (PRE_DBETA if site == "pre" else 0.0)


def _b(all_, head, mid, tail):
    return {"all": all_, "head": head, "mid": mid, "tail": tail}


# The default sweep: paper-like AdamW (brittle), its 2× step arm, Muon (broad), Dion 1/16
# (compact, loss matched to AdamW 2×), and a NoPE arm for AdamW and Muon (one seed).
DEFAULT_SERIES = (
    Series("adamw", 0.6, 0.12, _b(0.66, 0.60, 0.66, 0.70), _b(0.29, 0.20, 0.35, 0.44), loss0=4.0),
    Series("adamw", 0.7, 0.13, _b(0.70, 0.62, 0.70, 0.74), _b(0.33, 0.24, 0.40, 0.50), loss0=3.85, steps=120),
    Series("muon", 0.7, 0.32, _b(0.96, 0.90, 0.97, 1.00), _b(0.82, 0.75, 0.85, 0.95), loss0=3.7),
    Series(
        "dion_r1_16",
        0.41,
        0.20,
        _b(0.74, 0.70, 0.75, 0.80),
        _b(0.50, 0.45, 0.52, 0.60),
        loss0=3.855,
        optimizer="dion",
        params={"rank_fraction": 0.0625},
    ),
    Series(
        "adamw", 0.6, 0.12, _b(0.62, 0.58, 0.62, 0.66), _b(0.25, 0.18, 0.30, 0.40), loss0=4.1, seeds=(0,), pos="none"
    ),
    Series(
        "muon", 0.7, 0.32, _b(0.94, 0.88, 0.95, 0.98), _b(0.78, 0.70, 0.80, 0.90), loss0=3.75, seeds=(0,), pos="none"
    ),
)
WIDTHS = (32, 64, 128, 256)
D_MODEL = 32
N_LAYER = 3
LOSS_SLOPE = 0.1  # val loss falls by this per doubling of width


def config(
    name: str,
    s: Series,
    width: int,
    seed: int,
    *,
    d_model: int = D_MODEL,
    n_layer: int = N_LAYER,
    vocab_size: int = 512,
    seq_len: int = 32,
) -> dict:
    """A resolved config.json as ``RunConfig.to_dict`` writes it."""
    return {
        "name": name,
        "model": {
            "vocab_size": vocab_size,
            "seq_len": seq_len,
            "n_layer": n_layer,
            "n_head": 2,
            "d_model": d_model,
            "ffn_width": width,
            "ffn_mult": None,
            "activation": "relu2",
            "pos": s.pos,
        },
        "optimizer": {"name": s.optimizer or s.label, "label": s.label, "params": dict(s.params)},
        "data": {"source": "default", "tokenizer": "bpe", "vocab_size": vocab_size},
        "train": {
            "steps": s.steps,
            "batch_size": 8,
            "seed": seed,
            "eval_every": s.steps // 3,
            "log_every": s.steps // 6,
        },
        "telemetry": {"every": s.steps // 6, "window": 1, "sites": ["pre", "post"], "buckets": True},
        "versions": {"capscale": "test", "torch": "none"},
    }


def spectra_row(
    step: int, layer: int, site: str, bucket: str, soft: float, hard: float, dim: int, n_samples: int
) -> dict:
    """One spectra.parquet row with every ``spectrum_summary`` field, consistent with (soft, hard)."""
    if not 1 <= hard <= soft <= dim:
        raise AssertionError(f"planted ranks violate 1 <= R2 <= R1 <= D: {hard}, {soft}, {dim}")
    status = sampling_status(n_samples, dim)
    max_rank = min(dim, n_samples - 1)
    renyi_half = min(dim, soft * math.sqrt(soft / hard))
    return {
        "step": step,
        "layer": layer,
        "site": site,
        "bucket": bucket,
        "n_samples": n_samples,
        "dim": dim,
        "samples_per_dim": n_samples / dim,
        "max_empirical_rank": max_rank,
        "sampling_status": status,
        "soft_rank": soft,
        "hard_rank": hard,
        "renyi_rank_0_5": renyi_half,
        "renyi_rank_inf": hard / 2,
        "asymmetry": math.log(soft / hard),
        "spectral_entropy": math.log(soft),
        "participation_ratio": hard,
        "early_enrichment": 1.0 / hard,
        "lambda_max": 2.0 / hard,
        "trace": 1.0,
        "soft_rank_frac_dim": soft / dim,
        "hard_rank_frac_dim": hard / dim,
        "soft_rank_frac_max": soft / max_rank,
        "hard_rank_frac_max": hard / max_rank,
        "eigenvalues": list(0.9 ** np.arange(dim)),
    }


def write_run(
    run_dir: Path,
    cfg: dict,
    rows: list[dict],
    metrics: list[dict],
    status: str = "done",
    reason: str | None = None,
    step: int | None = None,
) -> Path:
    """Write one run directory from its parts (the contract's four files)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(cfg, indent=1))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    if rows:
        pd.DataFrame(rows).to_parquet(run_dir / "spectra.parquet", index=False)
    last = step if step is not None else (metrics[-1]["step"] if metrics else 0)
    (run_dir / "status.json").write_text(json.dumps({"status": status, "reason": reason, "step": last}))
    return run_dir


def planted_run(
    run_dir: Path,
    s: Series,
    width: int,
    seed: int,
    rng: np.random.Generator,
    *,
    name: str | None = None,
    widths=WIDTHS,
    n_layer: int = N_LAYER,
    n_logged: int = 6,
    step_noise: float = 0.03,
    seed_noise: float = 0.02,
    **cfg_kw,
) -> Path:
    """A finished run of series ``s`` at ``width`` with planted ranks and losses."""
    w0 = min(widths)
    steps = [s.steps * (i + 1) // n_logged for i in range(n_logged)]
    # run-to-run (seed) variation, drawn per measurement so the fits' errors are independent
    seed_factor = {
        (k, site, b): math.exp(rng.normal(0, seed_noise))
        for k in ("soft", "hard")
        for site in ("pre", "post")
        for b in ALL_BUCKETS
    }
    rows = []
    for step in steps:
        growth = 1 - 0.3 * math.exp(-3 * step / s.steps)  # ranks grow over training
        for layer in range(n_layer):
            layer_factor = 1 + 0.05 * (layer - 1)
            for site in ("pre", "post"):
                for bucket in ALL_BUCKETS:
                    r = {}
                    for kind, anchor in (("soft", s.soft0), ("hard", s.hard0)):
                        scale = BUCKET_SCALE[bucket] * (PRE_SCALE if site == "pre" else 1.0)
                        base = anchor * scale * w0 * (width / w0) ** s.beta(kind, site, bucket)
                        r[kind] = (
                            base
                            * layer_factor
                            * growth
                            * seed_factor[kind, site, bucket]
                            * math.exp(rng.normal(0, step_noise))
                        )
                    rows.append(
                        spectra_row(step, layer, site, bucket, r["soft"], r["hard"], width, BUCKET_SAMPLES[bucket])
                    )
    final = s.loss0 - LOSS_SLOPE * math.log2(width / w0) + rng.normal(0, 0.002)
    metrics = []
    for step in range(0, s.steps + 1, s.steps // 6):
        val = final + 2.0 * math.exp(-5 * step / s.steps)
        m = {"step": step, "loss": val + 0.05, "lr": 1e-3, "tokens_per_s": 1e4}
        if step % (s.steps // 3) == 0:
            m["val_loss"] = val
            m.update({f"val_loss_{b}": val + off for b, off in BUCKET_LOSS.items()})
        metrics.append(m)
    name = name or run_dir.name
    return write_run(run_dir, config(name, s, width, seed, n_layer=n_layer, **cfg_kw), rows, metrics)


def run_name(s: Series, width: int, seed: int) -> str:
    return f"{s.label}_w{width}_{'nope' if s.pos == 'none' else 'rope'}_t{s.steps}_s{seed}"


def write_sweep(
    root: Path, series=DEFAULT_SERIES, widths=WIDTHS, rng_seed: int = 0, names: dict | None = None, **run_kw
) -> Path:
    """A sweep directory of planted runs (every series × width × its seeds). ``names``: run_id → config name."""
    rng = np.random.default_rng(rng_seed)
    names = names or {}
    for s in series:
        for width in widths:
            for seed in s.seeds:
                rid = run_name(s, width, seed)
                planted_run(root / "runs" / rid, s, width, seed, rng, name=names.get(rid), widths=widths, **run_kw)
    return root


def write_unfinished(root: Path, s: Series, width: int, status: str, reason: str | None, seed: int = 0) -> Path:
    """A run that stopped early (diverged/failed/running): partial metrics, a partial spectra file."""
    rid = f"{run_name(s, width, seed)}_{status}"
    rows = [spectra_row(s.steps // 6, 0, "post", "all", 5.0, 2.0, width, 4096)]
    metrics = [
        {"step": 0, "loss": 6.0, "lr": 1e-3, "tokens_per_s": 1e4},
        {"step": s.steps // 6, "loss": float("nan") if status == "diverged" else 5.0, "lr": 1e-3, "tokens_per_s": 1e4},
    ]
    return write_run(root / "runs" / rid, config(rid, s, width, seed), rows, metrics, status=status, reason=reason)


def summary_rows(
    eigs_by_key: dict[tuple[int, int, str, str], np.ndarray | None], n_samples: int, dim: int
) -> list[dict]:
    """spectra rows computed from real spectra with ``spectrum_summary``: key = (step, layer, site, bucket).

    ``None`` instead of a spectrum writes an "insufficient" record (NaN ranks), as the probe does.
    """
    rows = []
    for (step, layer, site, bucket), eigs in eigs_by_key.items():
        rec = spectrum_summary(eigs, n_samples) if eigs is not None else spectrum_summary(None, 1, dim=dim)
        rows.append(
            {
                "step": step,
                "layer": layer,
                "site": site,
                "bucket": bucket,
                **rec,
                "eigenvalues": list(eigs) if eigs is not None else [],
            }
        )
    return rows


def depth_sweep(
    root: Path,
    betas: dict,
    widths=(64, 128, 256, 512),
    seeds=(0, 1, 2),
    steps: dict | None = None,
    noise: float = 0.01,
    rng_seed: int = 0,
) -> Path:
    """A sweep shaped like the ``cpu-depth`` study: ``betas[(optimizer, n_layer)]`` is the planted
    β_hard of each layer (β_soft = β_hard + 0.05), at every site and bucket; runs named as the
    preset names them (``adamw_w64_L6_t80_s0``); every record well sampled (N/D ≥ 16)."""
    rng = np.random.default_rng(rng_seed)
    steps = steps or {2: 40, 6: 80}
    for (opt, n_layer), layer_betas in betas.items():
        st = steps[n_layer]
        s = Series(opt, 0.5, 0.3, _b(0.5, 0.5, 0.5, 0.5), _b(0.5, 0.5, 0.5, 0.5), 3.0, steps=st)
        for width in widths:
            for seed in seeds:
                rows = []
                for step in (st * (i + 1) // 4 for i in range(4)):
                    for layer in range(n_layer):
                        for site in ("pre", "post"):
                            for bucket in ALL_BUCKETS:
                                b = layer_betas[layer]
                                hard = 0.3 * widths[0] * (width / widths[0]) ** b * math.exp(rng.normal(0, noise))
                                soft = (
                                    0.5 * widths[0] * (width / widths[0]) ** (b + 0.05) * math.exp(rng.normal(0, noise))
                                )
                                rows.append(spectra_row(step, layer, site, bucket, soft, hard, width, 16 * max(widths)))
                final = 3.0 - LOSS_SLOPE * math.log2(width / widths[0]) - (0.05 if opt == "muon" else 0.0)
                metrics = [
                    {"step": k, "loss": final + math.exp(-5 * k / st), "val_loss": final + math.exp(-5 * k / st)}
                    for k in range(0, st + 1, st // 4)
                ]
                name = f"{opt}_w{width}_L{n_layer}_t{st}_s{seed}"
                write_run(root / "runs" / name, config(name, s, width, seed, n_layer=n_layer), rows, metrics)
    return root
