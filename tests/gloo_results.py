"""What the multi-process (gloo) tests share: reading a spawned case's result, and comparing
its rows with the single-process reference."""

from __future__ import annotations

import pickle

import numpy as np
import pytest


def result(tmp, name: str):
    """The case's pickled result (written by rank 0), or the test fails with the ranks' errors."""
    path = tmp / f"{name}.pkl"
    if not path.exists():
        errs = sorted(tmp.glob(f"{name}.*.err")) or sorted(tmp.glob("spawn.err"))
        pytest.fail(f"{name} did not finish:\n" + "\n".join(e.read_text() for e in errs))
    with open(path, "rb") as f:
        return pickle.load(f)


def assert_rows_equal(df, ref, tol: float) -> None:
    """Row by row (both sorted alike): the same keys and counts, ranks and eigenvalues to ``tol``."""
    assert len(df) == len(ref)
    for a, b in zip(df.itertuples(), ref.itertuples()):
        assert (a.stack, a.layer, a.site, a.bucket, a.n_samples, a.dim) == (
            b.stack,
            b.layer,
            b.site,
            b.bucket,
            b.n_samples,
            b.dim,
        )
        np.testing.assert_allclose([a.soft_rank, a.hard_rank], [b.soft_rank, b.hard_rank], rtol=tol)
        np.testing.assert_allclose(
            np.sort(a.eigenvalues), np.sort(b.eigenvalues), rtol=0, atol=tol * max(b.eigenvalues)
        )
