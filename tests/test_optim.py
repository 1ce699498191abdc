"""Optimizers, each against an independent reference:

* AdamW = ``torch.optim.AdamW``; Muon = ``torch.optim.Muon`` (bit for bit with bf16
  Newton–Schulz; within bf16 round-off with our fp32 default) and ≈ the SVD polar factor;
* NorMuon's per-row normalisation (NorMuon paper's update written out here);
* Dion at full rank → the SVD polar factor and Muon's update; rank and error feedback;
* Shampoo's inverse root = SciPy's fractional matrix power; ≫ SGD on an ill-conditioned
  quadratic; grafted step length = AdamW's;
* all of them train a tiny GPT, resume bit-identically from a state_dict, refuse bad input.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from capscale.train.model import GPT, GPTConfig
from capscale.train.optim import (
    OPTIMIZERS,
    HybridOptimizer,
    build_optimizer,
    inverse_root,
    muon_scale,
    newton_schulz,
    optimizer_config,
    optimizer_defaults,
)

V, S = 64, 32
SHAPES = [(16, 32), (32, 16), (24, 24)]


pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=V, seq_len=S, n_layer=2, n_head=4, d_model=32))


def period2_batch(g: torch.Generator, batch: int = 16):
    """Sequences a b a b …: the next token is the one two back, so beating the
    uniform loss ln V needs attention, i.e. the hidden matrices must learn."""
    head = torch.randint(0, V, (batch, 2), generator=g)
    seq = head.repeat(1, S // 2 + 1)[:, : S + 1]
    return seq[:, :-1], seq[:, 1:]


def single_group(p: torch.Tensor, rule: str, lr: float, **hp) -> HybridOptimizer:
    return HybridOptimizer([dict(params=[p], rule=rule, lr=lr, base_lr=lr, **hp)])


MUON_HP = dict(momentum=0.95, nesterov=True, weight_decay=0.01, ns_steps=5)


def polar(G: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return (U @ Vh).to(G.dtype)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), 0).item()


# ----------------------------------------------------------------------------- AdamW


def test_adamw_equals_torch_adamw():
    ours, ref = tiny_gpt(), tiny_gpt()
    opt = build_optimizer("adamw", ours)
    roles = ref.param_groups()
    torch_opt = torch.optim.AdamW(
        [
            dict(params=roles["matrix"], weight_decay=0.01),
            dict(params=roles["embed"] + roles["head"], weight_decay=0.0),
        ],
        lr=3e-3,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    g = gen()
    for _ in range(6):
        x, y = period2_batch(g, 4)
        for model, o in ((ours, opt), (ref, torch_opt)):
            o.zero_grad()
            model(x, y)[1].backward()
            o.step()
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- Muon


def test_muon_equals_torch_muon_bitwise_with_bf16_newton_schulz():
    g = gen()
    for shape in SHAPES:
        w = torch.randn(shape, generator=g)
        p_ours, p_ref = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
        ours = single_group(p_ours, "muon", 0.02, **MUON_HP, ns_dtype="bfloat16")
        ref = torch.optim.Muon([p_ref], lr=0.02, weight_decay=0.01, momentum=0.95, nesterov=True)
        for _ in range(3):
            grad = torch.randn(shape, generator=g)
            p_ours.grad, p_ref.grad = grad.clone(), grad.clone()
            ours.step()
            ref.step()
            assert torch.equal(p_ours, p_ref), shape


@pytest.mark.parametrize("shape", SHAPES)
def test_newton_schulz_fp32_matches_torch_muon_update(shape):
    """Our fp32 iteration vs torch.optim.Muon's (bf16) update, and vs the exact polar factor."""
    G = torch.randn(shape, generator=gen(1))
    p = torch.nn.Parameter(torch.zeros(shape))
    ref = torch.optim.Muon([p], lr=1.0, weight_decay=0.0, momentum=0.0, nesterov=False)
    p.grad = G.clone()
    ref.step()
    torch_update = -p.detach() / muon_scale(shape)  # momentum 0: the update is NS(G)
    ours = newton_schulz(G)
    assert ours.dtype == torch.float32
    assert (ours - torch_update).norm() / ours.norm() < 0.03  # bf16 round-off
    sv = torch.linalg.svdvals(ours)
    assert sv.min() > 0.6 and sv.max() < 1.25  # ≈ orthogonal: S' ∈ ~[0.7, 1.2]
    assert cosine(ours, polar(G)) > 0.97
    with pytest.raises(ValueError, match="2-D"):
        newton_schulz(torch.randn(2, 3, 4))


def test_muon_scale():
    assert muon_scale((64, 16)) == 2.0 and muon_scale((16, 64)) == 1.0 and muon_scale((8, 8)) == 1.0


# ----------------------------------------------------------------------------- NorMuon


def _rows_of_unequal_scale(shape, seed=2):
    g = gen(seed)
    return torch.randn(shape, generator=g) * torch.logspace(-1, 1, shape[0])[:, None]


def test_normuon_first_step_equalises_rows():
    shape, lr = (48, 16), 0.02  # tall: Muon's orthogonal rows have unequal norms
    G = _rows_of_unequal_scale(shape)
    p = torch.nn.Parameter(torch.zeros(shape))
    opt = single_group(p, "normuon", lr, **{**MUON_HP, "weight_decay": 0.0}, ns_dtype="float32", beta2=0.95)
    p.grad = G.clone()
    opt.step()
    update = -p.detach() / (lr * muon_scale(shape))
    ortho = newton_schulz(G)  # Muon's update for the same first step (momentum direction ∝ G)
    muon_rows = ortho.square().mean(1)
    assert muon_rows.max() / muon_rows.min() > 1.5  # so equal rows below are NorMuon's doing
    rows = update.square().mean(1)
    torch.testing.assert_close(rows, torch.full_like(rows, ortho.square().mean().item()), rtol=1e-4, atol=0)
    torch.testing.assert_close(update.norm(), ortho.norm(), rtol=1e-5, atol=0)  # Frobenius kept
    assert opt.state[p]["second_momentum"].shape == (shape[0], 1)


def test_normuon_second_step_matches_paper_update():
    """Two steps against the NorMuon update written out from the paper (Li et al. 2025)."""
    shape, lr, mu, beta2 = (20, 12), 0.02, 0.95, 0.95
    g = gen(3)
    G1, G2 = _rows_of_unequal_scale(shape, 4), torch.randn(shape, generator=g)
    p = torch.nn.Parameter(torch.zeros(shape))
    opt = single_group(p, "normuon", lr, **{**MUON_HP, "weight_decay": 0.0}, ns_dtype="float32", beta2=beta2)
    p.grad = G1.clone()
    opt.step()
    before = p.detach().clone()
    p.grad = G2.clone()
    opt.step()
    update = -(p.detach() - before) / (lr * muon_scale(shape))

    buf1 = (1 - mu) * G1
    buf2 = mu * buf1 + (1 - mu) * G2
    O1, O2 = newton_schulz((1 - mu) * G1 + mu * buf1), newton_schulz((1 - mu) * G2 + mu * buf2)
    v = (1 - beta2) * O1.square().mean(1, keepdim=True)
    v = beta2 * v + (1 - beta2) * O2.square().mean(1, keepdim=True)
    expected = O2 / v.sqrt()
    expected = expected * O2.norm() / expected.norm()
    torch.testing.assert_close(update, expected, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- Dion


def _separated_spectrum(shape, seed=5):
    """A matrix with well-separated singular values, so power iteration converges fast."""
    g = gen(seed)
    m, n = shape
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=g)).Q
    W = torch.linalg.qr(torch.randn(n, k, generator=g)).Q
    return (U * torch.logspace(0, -2, k)) @ W.T


@pytest.mark.parametrize("shape", [(24, 16), (16, 24)])
def test_dion_full_rank_converges_to_muon_direction(shape):
    G = _separated_spectrum(shape)
    p = torch.nn.Parameter(torch.zeros(shape))
    opt = single_group(p, "dion", 1.0, momentum=0.95, weight_decay=0.0, rank_fraction=1.0, eps=1e-8, seed=0)
    p_ref = torch.nn.Parameter(torch.zeros(shape))
    muon = torch.optim.Muon([p_ref], lr=1.0, weight_decay=0.0, momentum=0.95)
    for _ in range(15):  # a stationary gradient: the warm-started power iteration converges
        before, before_ref = p.detach().clone(), p_ref.detach().clone()
        p.grad, p_ref.grad = G.clone(), G.clone()
        opt.step()
        muon.step()
    update = -(p.detach() - before) / muon_scale(shape)
    muon_update = -(p_ref.detach() - before_ref) / muon_scale(shape)
    assert (update - polar(G)).norm() / polar(G).norm() < 1e-2
    assert cosine(update, muon_update) > 0.97
    # full rank: P·Pᵀ·B = B, so error feedback leaves exactly μ·B in the momentum
    st = opt.state[p]
    B = st["momentum"] / 0.95
    torch.testing.assert_close(B / B.norm(), G / G.norm(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fraction, rank", [(1 / 2, 8), (1 / 4, 4), (1 / 16, 1), (0.3, 5)])
def test_dion_low_rank_update(fraction, rank):
    shape, lr = (40, 16), 0.01
    G = torch.randn(shape, generator=gen(6))
    p = torch.nn.Parameter(torch.zeros(shape))
    opt = single_group(p, "dion", lr, momentum=0.95, weight_decay=0.0, rank_fraction=fraction, eps=1e-8, seed=0)
    p.grad = G.clone()
    opt.step()
    update = -p.detach() / (lr * muon_scale(shape))
    assert opt.state[p]["Q"].shape == (16, rank)
    assert torch.linalg.matrix_rank(update).item() == rank
    # P has orthonormal columns and Q unit columns, so ‖P·Qᵀ‖_F² = rank
    torch.testing.assert_close(update.norm().square().item(), float(rank), rtol=1e-4, atol=0)
    # error feedback: what the rank-r step did not use stays in the momentum
    M = opt.state[p]["momentum"]
    assert M.norm() > 0.95 * G.norm() * 1.01
    P = torch.linalg.qr(update).Q[:, :rank]  # the update's column space = span(P)
    resid = G - P @ (P.T @ G)
    torch.testing.assert_close(M - P @ (P.T @ M), resid, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- Shampoo


def test_inverse_root_equals_scipy():
    g = gen(7)
    A = torch.randn(10, 6, generator=g, dtype=torch.float64)
    S_ = A @ A.T  # rank 6 of 10: the regulariser matters
    for eps in (1e-6, 1e-2):
        ours = inverse_root(S_, 4, eps).numpy()
        top = np.linalg.eigvalsh(S_.numpy()).max()
        ref = scipy.linalg.fractional_matrix_power(S_.numpy() + eps * top * np.eye(10), -0.25)
        np.testing.assert_allclose(ours, np.real(ref), rtol=1e-6, atol=1e-8)
    assert torch.equal(inverse_root(torch.zeros(3, 3), 4, 1e-6), torch.eye(3))
    with pytest.raises(FloatingPointError, match="diverged"):
        inverse_root(torch.full((3, 3), float("nan")), 4, 1e-6)


SHAMPOO_HP = dict(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, precondition_every=1, matrix_eps=1e-6, block_size=512)


def _analytic_root(stat: np.ndarray) -> np.ndarray:
    top = np.linalg.eigvalsh(stat).max()
    return np.real(scipy.linalg.fractional_matrix_power(stat + 1e-6 * top * np.eye(len(stat)), -0.25))


@pytest.mark.parametrize("block_size, n_tiles", [(512, 1), (5, 6)])  # 12×8 in tiles 5,5,2 × 5,3
def test_shampoo_preconditioner_and_graft(block_size, n_tiles):
    """Two steps: per tile, the roots are SciPy's (L + ε·λ_max)^-1/4 of the EMA
    statistics and the direction is L^-1/4 · m̂ · R^-1/4 (m̂: bias-corrected momentum);
    the step length is torch AdamW's."""
    shape, lr, (b1, b2) = (12, 8), 0.01, SHAMPOO_HP["betas"]
    g = gen(8)
    grads = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2)]
    p = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64))
    opt = single_group(p, "shampoo", lr, **{**SHAMPOO_HP, "block_size": block_size}, graft="adamw")
    p_ref = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64))
    adamw = torch.optim.AdamW([p_ref], lr=lr, betas=(b1, b2), eps=1e-8, weight_decay=0.0)
    m = torch.zeros(shape, dtype=torch.float64)
    for t, G in enumerate(grads, start=1):
        before, before_ref = p.detach().clone(), p_ref.detach().clone()
        p.grad, p_ref.grad = G.clone(), G.clone()
        opt.step()
        adamw.step()
        delta, delta_ref = before - p.detach(), before_ref - p_ref.detach()
        st = opt.state[p]
        assert sum(key.startswith("Lroot") for key in st) == n_tiles
        m = b1 * m + (1 - b1) * G
        m_hat = m / (1 - b1**t)
        direction = torch.empty_like(G)
        k = 0
        for r0 in range(0, 12, block_size):
            for c0 in range(0, 8, block_size):
                rs, cs = slice(r0, r0 + block_size), slice(c0, c0 + block_size)
                tiles = [Gi[rs, cs].numpy() for Gi in grads[:t]]
                L = sum((1 - b2) * b2 ** (t - 1 - i) * Gk @ Gk.T for i, Gk in enumerate(tiles))
                R = sum((1 - b2) * b2 ** (t - 1 - i) * Gk.T @ Gk for i, Gk in enumerate(tiles))
                np.testing.assert_allclose(st[f"Lroot{k}"].numpy(), _analytic_root(L), rtol=1e-6, atol=1e-9)
                np.testing.assert_allclose(st[f"Rroot{k}"].numpy(), _analytic_root(R), rtol=1e-6, atol=1e-9)
                direction[rs, cs] = st[f"Lroot{k}"] @ m_hat[rs, cs] @ st[f"Rroot{k}"]
                k += 1
        assert cosine(delta, direction) > 1 - 1e-12
        torch.testing.assert_close(delta.norm(), delta_ref.norm(), rtol=1e-10, atol=0)
        assert cosine(delta, delta_ref) < 0.99  # … but not AdamW's direction


def test_shampoo_beats_sgd_on_ill_conditioned_quadratic():
    """f(W) = ½ tr(Eᵀ A E B), E = W − W*, with A and B of condition number 100 in random
    bases (Hessian B ⊗ A, condition 10⁴). SGD at the textbook step 1/λ_max barely moves
    the flat directions; Shampoo's L^-1/4 · G · R^-1/4 undoes most of the curvature."""
    g = gen(9)
    m, n = 12, 8

    def spd(k):
        Q = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64)).Q
        return (Q * torch.logspace(0, 2, k, dtype=torch.float64)) @ Q.T

    A, B = spd(m), spd(n)
    W_star = torch.randn(m, n, generator=g, dtype=torch.float64)

    def loss(W):
        E = W - W_star
        return 0.5 * float((A @ E @ B * E).sum())

    def run(opt_factory, steps=100):
        p = torch.nn.Parameter(torch.zeros(m, n, dtype=torch.float64))
        opt = opt_factory(p)
        for _ in range(steps):
            p.grad = A @ (p.detach() - W_star) @ B
            opt.step()
        return loss(p.detach())

    start = loss(torch.zeros(m, n, dtype=torch.float64))
    lam_max = float(torch.linalg.eigvalsh(A).max() * torch.linalg.eigvalsh(B).max())
    sgd = run(lambda p: torch.optim.SGD([p], lr=1.0 / lam_max))
    shampoo = run(
        lambda p: single_group(
            p, "shampoo", 0.3, **{**SHAMPOO_HP, "betas": (0.0, 0.999), "matrix_eps": 1e-10}, graft="none"
        )
    )
    assert sgd > 1e-3 * start  # SGD is stuck on the flat directions
    assert shampoo < 1e-4 * sgd


# ----------------------------------------------------------------------------- all optimizers on a GPT


def _train(name, steps=30, **hp):
    model = tiny_gpt()
    opt = build_optimizer(name, model, **hp)
    g = gen(1)
    losses = []
    for _ in range(steps):
        x, y = period2_batch(g)
        opt.zero_grad()
        loss = model(x, y)[1]
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_trains_a_tiny_gpt(name):
    losses = _train(name)
    assert abs(losses[0] - math.log(V)) < 0.05
    assert np.mean(losses[-5:]) < 3.8  # ln 64 = 4.16; needs attention, i.e. the matrix rule


def test_training_threshold_needs_the_matrix_rule():
    # control for the test above: with the hidden matrices frozen (lr ≈ 0) the loss stays ≈ ln V
    losses = _train("muon", lr=1e-12)
    assert np.mean(losses[-5:]) > 4.0


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_state_dict_round_trip_is_bit_identical(name):
    hp = {"precondition_every": 2} if name == "shampoo" else {}
    model = tiny_gpt()
    opt = build_optimizer(name, model, **hp)
    g = gen(2)
    batches = [period2_batch(g, 4) for _ in range(6)]

    def step(m, o, batch, k):
        for group in o.param_groups:  # what the training loop does with the schedule
            group["lr"] = group["base_lr"] * (1 - k / 10)
        o.zero_grad()
        m(*batch)[1].backward()
        o.step()

    for k in range(3):
        step(model, opt, batches[k], k)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    for k in range(3, 6):
        step(model, opt, batches[k], k)

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = tiny_gpt(seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(ckpt["model"])
    opt2 = build_optimizer(name, resumed, **hp)
    opt2.load_state_dict(ckpt["opt"])
    for k in range(3, 6):
        step(resumed, opt2, batches[k], k)

    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for sa, sb in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        assert sa.keys() == sb.keys()
        for key in sa:
            va, vb = sa[key], sb[key]
            assert torch.equal(va, vb) if torch.is_tensor(va) else va == vb


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_zero_lr_freezes_every_parameter(name):
    """The loop's contract: group["lr"] is read at every step (decay included)."""
    model = tiny_gpt()
    opt = build_optimizer(name, model)
    for group in opt.param_groups:
        assert group["base_lr"] == group["lr"] > 0
        group["lr"] = 0.0
    before = [p.detach().clone() for p in model.parameters()]
    for k in range(2):
        opt.zero_grad()
        model(*period2_batch(gen(k), 4))[1].backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ----------------------------------------------------------------------------- registry and input checks


def test_paper_defaults_and_groups():
    assert optimizer_defaults("adamw") == dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    for name in ("muon", "normuon"):
        d = optimizer_defaults(name)
        assert (d["lr"], d["momentum"], d["nesterov"], d["weight_decay"]) == (0.02, 0.95, True, 0.01)
    assert optimizer_defaults("normuon")["beta2"] == 0.95
    assert 1 / 16 <= optimizer_defaults("dion")["rank_fraction"] <= 1 / 2
    model = tiny_gpt()
    adamw = {g["role"]: g for g in build_optimizer("adamw", model).param_groups}
    assert (adamw["matrix"]["weight_decay"], adamw["embed"]["weight_decay"], adamw["head"]["weight_decay"]) == (
        0.01,
        0.0,
        0.0,
    )
    for name in ("muon", "normuon", "dion", "shampoo"):
        groups = {g["role"]: g for g in build_optimizer(name, model, lr=0.05, adamw_lr=1e-3).param_groups}
        assert groups["matrix"]["rule"] == name and groups["matrix"]["base_lr"] == 0.05
        for role in ("embed", "head"):
            assert groups[role]["rule"] == "adamw" and groups[role]["weight_decay"] == 0.0
            assert groups[role]["base_lr"] == 1e-3 and groups[role]["betas"] == (0.9, 0.95)
    assert optimizer_config("adamw", betas=[0.8, 0.9]).betas == (0.8, 0.9)  # lists from TOML


@pytest.mark.parametrize(
    "name, hp, match",
    [
        ("sgd", {}, r"unknown optimizer 'sgd'; valid: \['adamw', 'dion', 'muon', 'normuon', 'shampoo'\]"),
        ("muon", {"beta2": 0.9}, r"unknown hyperparameter\(s\) \['beta2'\] for optimizer 'muon'; valid: \["),
        ("adamw", {"momentum": 0.9}, r"valid: \['betas', 'eps', 'lr', 'weight_decay'\]"),
        ("adamw", {"lr": -1.0}, r"AdamWConfig.lr must be a number in \(0, inf\]"),
        ("adamw", {"lr": float("nan")}, "lr must be a number"),
        ("adamw", {"betas": (1.0, 0.9)}, "betas must be a number in"),
        ("adamw", {"betas": (0.9,)}, "betas must be a pair"),
        ("adamw", {"weight_decay": -0.1}, "weight_decay"),
        ("muon", {"momentum": 1.0}, "momentum must be a number in"),
        ("muon", {"nesterov": "yes"}, "nesterov must be a bool"),
        ("muon", {"ns_steps": 0}, "ns_steps must be an int ≥ 1"),
        ("muon", {"ns_dtype": "float8"}, "ns_dtype must be one of"),
        ("muon", {"adamw_lr": 0.0}, "adamw_lr"),
        ("normuon", {"beta2": 1.5}, "beta2"),
        ("dion", {"rank_fraction": 0.0}, "rank_fraction"),
        ("dion", {"rank_fraction": 1.5}, "rank_fraction"),
        ("dion", {"seed": -1}, "seed"),
        ("shampoo", {"precondition_every": 0}, "precondition_every"),
        ("shampoo", {"graft": "lion"}, "graft must be one of"),
        ("shampoo", {"block_size": 0}, "block_size must be an int ≥ 1"),
        ("shampoo", {"lr": "3e-3"}, "lr must be a number"),
    ],
)
def test_bad_names_and_hyperparameters_raise(name, hp, match):
    with pytest.raises(ValueError, match=match):
        build_optimizer(name, tiny_gpt(), **hp)


def test_bad_models_and_groups_raise():
    with pytest.raises(TypeError, match="param_groups"):
        build_optimizer("adamw", torch.nn.Linear(3, 3))
    w = torch.nn.Parameter(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="rule must be one of"):
        HybridOptimizer([dict(params=[w], rule="lion", lr=1.0, base_lr=1.0)])
    with pytest.raises(ValueError, match=r"lacks \['base_lr'\]"):
        HybridOptimizer([dict(params=[w], rule="adamw", lr=1.0, betas=(0.9, 0.9), eps=1e-8, weight_decay=0.0)])
    with pytest.raises(ValueError, match="2-D matrices only"):
        single_group(torch.nn.Parameter(torch.zeros(4)), "muon", 0.02, **MUON_HP, ns_dtype="auto")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 Newton–Schulz is a CUDA path")
def test_muon_auto_uses_bf16_on_cuda_and_matches_torch():
    w = torch.randn(32, 16, device="cuda")
    p_ours, p_ref = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    ours = single_group(p_ours, "muon", 0.02, **MUON_HP, ns_dtype="auto")
    ref = torch.optim.Muon([p_ref], lr=0.02, weight_decay=0.01, momentum=0.95)
    grad = torch.randn(32, 16, device="cuda")
    p_ours.grad, p_ref.grad = grad.clone(), grad.clone()
    ours.step()
    ref.step()
    torch.testing.assert_close(p_ours, p_ref, rtol=1e-3, atol=1e-4)


@pytest.fixture
def scratch_registry():
    """Declarations made inside a test are removed afterwards."""
    from capscale.train.optim import OPTIMIZERS, RULES, SPECS

    before = set(SPECS)
    yield
    for name in set(SPECS) - before:
        del SPECS[name], OPTIMIZERS[name], RULES[name]


def test_one_declaration_makes_an_optimizer(scratch_registry):
    """A config class with @register is everything: by name, hyperparameter checks, group keys, matrix-only."""
    from dataclasses import dataclass

    from capscale.train.optim import SPECS, MatrixConfig, register

    @register("signsgd_test")
    @dataclass(frozen=True)
    class SignConfig(MatrixConfig):
        lr: float = 0.01
        weight_decay: float = 0.0

        @staticmethod
        def rule(opt, group):
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])

    assert SPECS["signsgd_test"].keys == ("weight_decay",) and SPECS["signsgd_test"].matrix_only
    model = tiny_gpt()
    opt = build_optimizer("signsgd_test", model, lr=0.5)
    matrix = next(g for g in opt.param_groups if g["role"] == "matrix")
    assert matrix["rule"] == "signsgd_test" and matrix["weight_decay"] == 0.0
    w = matrix["params"][0]
    before = w.detach().clone()
    w.grad = torch.randn_like(w)
    opt.step()
    torch.testing.assert_close(w.detach(), before - 0.5 * w.grad.sign())
    with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) \['momentum'\]"):
        optimizer_config("signsgd_test", momentum=0.9)
    with pytest.raises(ValueError, match="2-D matrices only"):
        single_group(torch.nn.Parameter(torch.zeros(4)), "signsgd_test", 0.1, weight_decay=0.0)
    with pytest.raises(ValueError, match="declared twice"):
        register("signsgd_test")(SignConfig)


def test_registry_keys_are_what_the_groups_carry():
    """Every declared optimizer's matrix group carries exactly its derived keys (nothing missing, nothing extra)."""
    from capscale.train.optim import SPECS

    model = tiny_gpt()
    for name, spec in SPECS.items():
        group = next(g for g in build_optimizer(name, model).param_groups if g["role"] == "matrix")
        assert set(group) - {"params", "role", "rule", "lr", "base_lr"} == set(spec.keys), name
        assert group["rule"] == name
