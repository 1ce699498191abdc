"""``capscale fit``: refits the paper's published points to its published β; groups, bad input."""

import argparse
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from capscale import fitcli

FIXTURES = Path(__file__).parent / "fixtures" / "paper_reference"
POINTS = FIXTURES / "global_rank_points.csv"


def _run(argv):
    parser = argparse.ArgumentParser()
    fitcli.add_arguments(parser)
    return fitcli.run(parser.parse_args(argv))


def test_published_points_give_published_beta(capsys, tmp_path):
    out_csv = tmp_path / "fits.csv"
    assert _run([str(POINTS), "--x", "ffn_hidden_dim", "--y", "value", "--out", str(out_csv)]) == 0
    printed = capsys.readouterr().out.splitlines()
    published = pd.read_csv(FIXTURES / "beta_table.csv")
    assert len(printed) == 1 + len(published)  # header + one row per optimizer_variant × metric
    for row in published.itertuples():
        line = next(ln for ln in printed if ln.split()[:2] == [row.optimizer_variant, row.metric])
        assert f"{row.beta:.3f}" in line and f"[{row.beta_lower:.3f}, {row.beta_upper:.3f}]" in line, line
        assert f"{row.r_squared:.3f}" in line and line.split()[-1] == "8"
    table = pd.read_csv(out_csv)  # full precision
    merged = table.merge(published, on=["optimizer_variant", "metric"])
    assert len(merged) == 10
    assert np.allclose(merged["beta_x"], merged["beta_y"], atol=1e-12)
    assert np.allclose(merged["ci_low"], merged["beta_lower"], atol=1e-12)


def test_groups_default_to_non_numeric_columns_and_numeric_ones_pool(tmp_path):
    rng = np.random.default_rng(0)
    w = np.repeat([64, 128, 256, 512], 3)
    df = pd.concat(
        [
            pd.DataFrame(
                {
                    "width": w,
                    "seed": np.tile([0, 1, 2], 4),
                    "opt": name,
                    "value": 2.0 * w**beta * np.exp(rng.normal(0, 0.01, w.size)),
                }
            )
            for name, beta in (("a", 0.5), ("b", 0.9))
        ]
    )
    table = fitcli.fit_table(df).set_index("opt")
    assert list(table.index) == ["a", "b"] and set(table["n"]) == {12}  # seeds pooled as replicates
    assert table.loc["a", "beta"] == pytest.approx(0.5, abs=0.02)
    assert table.loc["b", "beta"] == pytest.approx(0.9, abs=0.02)
    by_seed = fitcli.fit_table(df, by=["opt", "seed"])
    assert len(by_seed) == 6 and set(by_seed["n"]) == {4}


def test_too_few_widths_is_a_row_not_a_crash(tmp_path, capsys):
    path = tmp_path / "p.csv"
    pd.DataFrame({"g": ["x", "x", "y", "y", "y"], "width": [1, 2, 1, 2, 4], "value": [1, 2, 1, 2, 4]}).to_csv(
        path, index=False
    )
    assert _run([str(path)]) == 0
    out = capsys.readouterr().out
    assert "not fittable: a power-law fit needs at least 3 distinct widths, got 2" in out
    assert "1.000" in out  # group y: exact β = 1


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such points file"):
        _run([str(tmp_path / "missing.csv")])
    with pytest.raises(ValueError, match=r"column\(s\) \['width'\] not in the CSV"):
        _run([str(POINTS)])
    with pytest.raises(ValueError, match="'metric' must be numeric"):
        _run([str(POINTS), "--x", "ffn_hidden_dim", "--y", "metric"])


def test_missing_and_non_finite_rows_are_left_out_alike_and_said(tmp_path, capsys):
    path = tmp_path / "p.csv"
    width = [1, 2, 4, 8, 8, 8]
    pd.DataFrame({"width": width, "value": [1.0, 2.0, 4.0, 8.0, np.nan, np.inf]}).to_csv(path, index=False)
    assert _run([str(path), "--out", str(tmp_path / "t.csv")]) == 0
    table = pd.read_csv(tmp_path / "t.csv")
    assert table["beta"].iloc[0] == pytest.approx(1.0) and table["n"].iloc[0] == 4
    assert table["note"].iloc[0] == "2 row(s) with a missing or non-finite width/value left out"
    assert "2 row(s) with a missing or non-finite" in capsys.readouterr().out


def _write(path, text):
    path.write_text(text) if isinstance(text, str) else path.write_bytes(text)
    return str(path)


@pytest.mark.parametrize(
    "content, extra, message",
    [
        ("width,value\n", [], r"p\.csv: the CSV has columns \['width', 'value'\] but no rows"),
        ("", [], r"p\.csv is not a readable CSV"),
        (b"width,value\n1,\xff\xfe\n", [], r"p\.csv is not a readable CSV"),
        ("width,value\n1,1\n2,2\n4,4\n", ["--confidence", "2"], r"--confidence must be in \(0, 1\), got 2\.0"),
        ("width,value\n1,1\n2,2\n4,4\n", ["--confidence", "0"], r"--confidence must be in \(0, 1\)"),
        ("width,value\n1,1\n2,2\n4,4\n", ["--digits", "-1"], r"--digits must be >= 0"),
        ("width,rank\n1,1\n", [], r"p\.csv: column\(s\) \['value'\] not in the CSV"),
    ],
)
def test_bad_input_is_one_line_naming_the_file_or_argument(tmp_path, capsys, content, extra, message):
    from capscale.cli import main

    points = _write(tmp_path / "p.csv", content)
    out = tmp_path / "t.csv"
    assert main(["fit", points, "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("capscale fit: error: ")
    assert re.search(message, err), err
    assert not out.exists()


def test_a_run_column_is_an_identifier_not_a_group(tmp_path, capsys):
    # issue 30, item 11: an exported points file names each point's run; grouping by it left nothing fittable
    w = np.repeat([64, 128, 256], 2)
    df = pd.DataFrame(
        {
            "run": [f"adamw_w{x}_s{s}" for x, s in zip(w, [0, 1] * 3)],
            "opt": "adamw",
            "width": w,
            "value": 2.0 * w**0.5 * np.array([1.0, 1.01, 0.99, 1.0, 1.02, 0.98]),
        }
    )
    table = fitcli.fit_table(df)
    assert list(table["opt"]) == ["adamw"] and "run" not in table.columns
    assert table.loc[0, "beta"] == pytest.approx(0.5, abs=0.03) and table.loc[0, "n"] == 6
    df.to_csv(tmp_path / "p.csv", index=False)
    assert _run([str(tmp_path / "p.csv")]) == 0
    out = capsys.readouterr()
    assert "not grouped by ['run']" in out.err and "adamw" in out.out
