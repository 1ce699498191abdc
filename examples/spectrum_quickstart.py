"""Spectral core in one screen: how much of an FFN's width does a random ReLU² layer realize?

Streams activations of a randomly initialised FFN (d_model 128, widths 128…2048)
through StreamingCovariance, summarises each spectrum and fits rank ∝ width^β.
Runs in seconds on a laptop CPU; no model, data or GPU needed.
"""

import numpy as np

from capscale.spectrum import StreamingCovariance, fit_power_law

rng = np.random.default_rng(0)
d_model, widths, n_batches, batch = 128, [128, 256, 512, 1024, 2048], 16, 1024
# Inputs with a decaying spectrum, like real residual streams.
mix = rng.standard_normal((d_model, d_model)) * (np.arange(1, d_model + 1) ** -0.5)

print(f"{'width':>6} {'soft rank':>10} {'hard rank':>10} {'N/D':>6} {'status':>24}")
soft, hard = [], []
for width in widths:
    w_in = rng.standard_normal((d_model, width)) / np.sqrt(d_model)
    acc = StreamingCovariance(width)
    for _ in range(n_batches):  # streaming: no activation buffer is kept
        x = rng.standard_normal((batch, d_model)) @ mix
        acc.update(np.maximum(x @ w_in, 0.0) ** 2)  # ReLU², the paper's FFN activation
    rec = acc.summary()
    soft.append(rec["soft_rank"])
    hard.append(rec["hard_rank"])
    print(
        f"{width:>6} {rec['soft_rank']:>10.1f} {rec['hard_rank']:>10.1f} "
        f"{rec['samples_per_dim']:>6.1f} {rec['sampling_status']:>24}"
    )

for name, values in (("soft", soft), ("hard", hard)):
    fit = fit_power_law(widths, values)
    print(f"beta_{name} = {fit.beta:.3f}  95% CI [{fit.ci_low:.3f}, {fit.ci_high:.3f}]  R² = {fit.r2:.3f}")
