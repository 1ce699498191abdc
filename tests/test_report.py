"""capscale.report: report.json content, escaping of user strings, offline HTML rendered in headless Chromium."""

import argparse
import dataclasses
import html
import json
import re
import subprocess
from pathlib import Path

import pytest
from synthetic_runs import DEFAULT_SERIES, write_sweep, write_unfinished

from capscale.report import build_report
from capscale.report import command as report_command

XSS_NAME = "<script>alert(1)</script>"
XSS_LABEL = "<img src=x onerror=alert(2)> $5"  # also mathtext ($) and a space for the figures
WIDTHS = (32, 64, 128)
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    series = [dataclasses.replace(s, seeds=(0, 1, 2)) for s in DEFAULT_SERIES[:4]]  # 3 seeds: intervals over seeds
    series[3] = dataclasses.replace(series[3], label=XSS_LABEL)  # Dion 1/16, loss-matched to AdamW 2×
    write_sweep(root, series=series, widths=WIDTHS, names={"muon_w64_rope_t60_s0": XSS_NAME})
    write_unfinished(root, series[2], 256, "diverged", "loss is NaN at step 10")
    files = build_report(root, n_resamples=300, tolerance=0.02)
    data = json.loads(files.json.read_text(encoding="utf-8"))
    return files, data, files.html.read_text(encoding="utf-8"), files.markdown.read_text(encoding="utf-8")


def test_files_written(report):
    files, _, page, md = report
    assert files.html == files.out_dir / "index.html" and files.out_dir.name == "report"
    assert set(files.figures) == {
        "scaling",
        "levels",
        "matched_loss",
        "asymmetry",
        "phase_map",
        "regimes",
        "bucket_loss",
        "optimizer_architecture",
        "loss_curves",
        "rank_trajectories",
        "beta_trajectory",
    }
    for path in files.figures.values():
        assert path.read_bytes().startswith(b"\x89PNG")
        assert f"figures/{path.name}" in md
    # ≥ 150 DPI: the scaling figure is 12 inches wide (PNG IHDR width, big-endian at byte 16)
    assert int.from_bytes(files.figures["scaling"].read_bytes()[16:20], "big") >= 12 * 150
    assert page.count('<img src="data:image/png;base64,') == len(files.figures)


def test_json_holds_betas_with_intervals_for_every_label_and_bucket(report):
    _, data, _, _ = report
    labels = {"adamw", "muon", XSS_LABEL}
    assert set(data["sweep"]["labels"]) == labels
    for label in labels:
        for bucket in ("all", "head", "mid", "tail"):
            rows = [b for b in data["betas"] if b["label"] == label and b["bucket"] == bucket and b["site"] == "post"]
            assert rows, (label, bucket)
            for row in rows:
                for kind in ("beta_soft", "beta_hard", "beta_delta"):
                    b = row[kind]
                    assert b["fittable"] and b["ci_low"] < b["beta"] < b["ci_high"], (label, bucket, kind)
                    assert b["boot_low"] is not None and b["n"] >= 3
    assert data["parameters"]["last_k"] == 5 and data["parameters"]["tolerance"] == 0.02
    assert data["parameters"]["phase"] == {
        "collapsed_soft": 0.05,
        "broad_soft": 0.5,
        "brittle_ratio": 0.25,
        "impossible_tol": 1e-9,
    }
    assert data["versions"]["matplotlib"]


def test_html_numbers_come_from_json(report):
    _, data, page, _ = report
    for row in data["summary"]["headline"]:
        b = row["beta_hard"]
        assert f"{b['beta']:.3f} [{b['ci_low']:.3f}, {b['ci_high']:.3f}]" in page
    for pair in data["q2_matched_loss"]["pairs"]:
        assert f"{pair['val_loss_a']:.4f}" in page
    for finding in data["summary"]["findings"]:
        assert html.escape(finding) in page


def test_five_questions_in_order_with_their_figures(report):
    _, _, page, _ = report
    order = [
        'class="answers"',
        'id="q1"',
        'id="fig-scaling"',
        'id="fig-levels"',
        'id="q2"',
        'id="fig-matched_loss"',
        'id="q3"',
        'id="fig-asymmetry"',
        'id="fig-phase_map"',
        'id="q4"',
        'id="fig-regimes"',
        'id="fig-bucket_loss"',
        'id="q5"',
        'id="fig-optimizer_architecture"',
        'id="training"',
        'id="reliability"',
        'id="runs"',
        'id="parameters"',
    ]
    positions = [page.index(o) for o in order]
    assert positions == sorted(positions)


def test_matched_pair_diverged_run_and_parameters_are_reported(report):
    _, data, page, _ = report
    pairs = {frozenset((p["series_a"], p["series_b"])) for p in data["q2_matched_loss"]["pairs"]}
    assert pairs == {frozenset(("adamw · 120 steps", XSS_LABEL))}
    assert [r["status"] for r in data["excluded_runs"]] == ["diverged"]
    assert "muon_w256_rope_t60_s0_diverged" in page and "loss is NaN at step 10" in page
    for text in (
        "brittle if r2/r1 &lt; 0.25",
        "collapsed if r1 &lt; 0.05",
        "broad if r1 ≥ 0.5",
        "median of the last 5 logged steps per layer within the final 20% of each run",
        "N/D",
    ):
        assert text in page, text


def test_user_strings_are_escaped(report):
    _, data, page, md = report
    for raw in (XSS_NAME, "<img src=x", "<script"):
        assert raw not in page, raw
        assert re.search(r"(?<!\\)" + re.escape(raw), md) is None, raw  # Markdown: every < is backslash-escaped
    assert "&lt;" not in md and "&gt;" not in md and "&amp;" not in md  # no HTML entities in report.md
    assert r"\<img src=x onerror=alert(2)\> $5" in md
    assert html.escape(XSS_NAME) in page
    assert html.escape(XSS_LABEL) in page
    assert XSS_NAME in {r["name"] for r in data["runs"]}  # JSON keeps the name as given


def test_self_contained_no_external_resources(report):
    _, _, page, _ = report
    refs = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert refs and all(r.startswith(("data:image/png;base64,", "#")) for r in refs)
    assert "http://" not in page and "https://" not in page and "<link" not in page


# A probe added to a copy of the page: it records script errors from the first moment and,
# on load, whether each image decoded; --dump-dom prints the DOM with the result.
PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || e.type)), true);
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const bad = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt);
  // every figure is referenced by a link in the text
  const linked = new Set(Array.from(document.querySelectorAll('a[href^="#fig-"]')).map(a => a.hash.slice(1)));
  const unreferenced = Array.from(document.querySelectorAll('figure[id]')).map(f => f.id).filter(id => !linked.has(id));
  // a table's first (answer) column is in view without scrolling it sideways
  const hidden = Array.from(document.querySelectorAll('td.answer')).filter(c => {
    if (c.closest('details:not([open])')) return false;
    const box = c.closest('.table-wrap').getBoundingClientRect();
    const r = c.getBoundingClientRect();
    return r.left < box.left - 1 || r.right > Math.min(box.right, window.innerWidth) + 1;
  }).map(c => c.closest('.table-wrap').previousElementSibling.textContent);
  // no heading is cut off
  const clipped = Array.from(document.querySelectorAll('h1, h2, h3, figcaption'))
    .filter(h => h.scrollWidth > h.clientWidth + 1).map(h => h.textContent);
  // each figure's rendered width (px), for the legibility check against the figure's own layout
  const widths = Object.fromEntries(Array.from(document.querySelectorAll('figure[id] img'))
    .map(i => [i.closest('figure').id, i.getBoundingClientRect().width]));
  const out = document.createElement('pre');
  out.id = 'capscale-probe';
  out.textContent = JSON.stringify({n: imgs.length, bad: bad, errors: window.__errors, unreferenced: unreferenced,
                                    hidden_answers: hidden, clipped: clipped, widths: widths});
  document.body.appendChild(out);
});
</script>"""


def _render(page: str, tmp_path: Path) -> dict:
    tmp_path.mkdir(parents=True)
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("<head>", "<head>" + PROBE, 1), encoding="utf-8")
    profile = tmp_path / "profile"
    cmd = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1280,900",
        "--dump-dom",
        probe.as_uri(),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False).stdout
    found = re.search(r'<pre id="capscale-probe">(.*?)</pre>', out, re.DOTALL)
    assert found, f"probe did not report; chromium printed {out[:300]!r}"
    return json.loads(html.unescape(found.group(1)))


@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless Chromium not installed (Debian: apt-get install chromium)")
def test_renders_in_headless_chromium(report, tmp_path):
    _, _, page, _ = report
    result = _render(page, tmp_path / "report")
    result.pop("widths")
    assert result == {"n": 11, "bad": [], "errors": [], "unreferenced": [], "hidden_answers": [], "clipped": []}
    # the probe itself catches a broken figure and a script error (so a pass above means something)
    broken = page.replace("data:image/png;base64,iVBOR", "data:image/png;base64,AAAA", 1)
    broken = broken.replace("</body>", "<script>undefined_function()</script></body>")
    result = _render(broken, tmp_path / "broken")
    assert len(result["bad"]) == 1 and len(result["errors"]) >= 1
    # ... and a figure no text refers to, and a table whose answer column sits off-screen
    unref = page.replace('<a href="#fig-phase_map">', '<a href="#nowhere">')
    hidden = unref.replace('<div class="table-wrap">', '<div class="table-wrap" style="margin-left: 3000px">', 1)
    result = _render(hidden, tmp_path / "bad2")
    assert result["unreferenced"] == ["fig-phase_map"] and result["hidden_answers"]


def test_report_command_and_sweep_defaults(tmp_path, capsys):
    root = write_sweep(tmp_path / "sw", series=(DEFAULT_SERIES[2],), widths=WIDTHS)
    (root / "sweep.json").write_text(json.dumps({"name": "tiny", "analysis": {"last_k": 2}}))
    parser = argparse.ArgumentParser()
    report_command.add_arguments(parser)
    assert report_command.run(parser.parse_args([str(root), "--bootstrap", "200"])) == 0
    data = json.loads((root / "report" / "report.json").read_text(encoding="utf-8"))
    assert data["parameters"]["last_k"] == 2 and data["sweep"]["name"] == "tiny"  # from sweep.json
    out = tmp_path / "elsewhere"
    args = parser.parse_args(
        [str(root), "--out", str(out), "--last-k", "3", "--bootstrap", "200", "--brittle-ratio", "0.3"]
    )
    assert report_command.run(args) == 0
    data = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert data["parameters"]["last_k"] == 3 and data["parameters"]["phase"]["brittle_ratio"] == 0.3
    assert str(out / "index.html") in capsys.readouterr().out


def test_report_with_unfittable_series(tmp_path):
    root = write_sweep(tmp_path, series=(DEFAULT_SERIES[2],), widths=(32, 64))
    files = build_report(root, n_resamples=200)
    data = json.loads(files.json.read_text(encoding="utf-8"))
    assert all(not b["beta_hard"]["fittable"] for b in data["betas"])
    assert "not fittable" in files.html.read_text(encoding="utf-8")
    assert data["answers"][0]["verdict"] == "not measured"
    assert "3 or more widths" in data["answers"][0]["finding"]


def test_minimal_sweep_without_buckets_validation_or_pre_site(tmp_path):
    """Telemetry with buckets off and post only, no evaluation logged: the report still builds."""
    import warnings

    import pandas as pd

    root = write_sweep(tmp_path, series=(DEFAULT_SERIES[2],), widths=WIDTHS)
    for run in (root / "runs").iterdir():
        spectra = pd.read_parquet(run / "spectra.parquet")
        spectra[(spectra["bucket"] == "all") & (spectra["site"] == "post")].to_parquet(run / "spectra.parquet")
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        (run / "metrics.jsonl").write_text(
            "".join(json.dumps({k: m[k] for k in ("step", "loss")}) + "\n" for m in metrics)
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no empty legends, no all-NaN reductions
        files = build_report(root, n_resamples=200)
    data = json.loads(files.json.read_text(encoding="utf-8"))
    assert {(b["site"], b["bucket"]) for b in data["betas"]} == {("post", "all")}
    assert data["q2_matched_loss"]["pairs"] == []
    assert data["q5_optimizer_architecture"]["arch_axes"] == []
    page = files.html.read_text(encoding="utf-8")
    assert "no pair of series agrees within the tolerance" in page
    assert "No architecture axis varied" in page


def test_answers_one_verdict_per_question_by_the_interval_rule(report):
    _, data, page, md = report
    answers = data["answers"]
    assert [a["id"] for a in answers] == ["q1", "q2", "q3", "q4", "q5"]
    assert all(a["verdict"] in ("resolved", "not resolved", "not measured") and a["finding"] for a in answers)
    by = {a["id"]: a for a in answers}
    # planted: muon's ranks are several times adamw's at every width, and β_hard 0.82 vs 0.29
    # within the one cell (60 steps), Holm over the level and β comparisons; the power it had is stated
    q1 = by["q1"]["finding"]
    assert by["q1"]["verdict"] == "resolved" and "60 steps: muon − adamw" in q1 and "Holm-corrected over" in q1
    assert "minimum detectable Δβ_hard at 80% power" in q1 and "paper's gap" in q1
    assert "120 steps" not in q1  # AdamW's 2×-steps arm shares no cell with another optimizer
    levels = [r for r in data["levels"] if r["bucket"] == "all" and r["metric"] == "hard_rank"]
    muon = next(r for r in levels if r["series"] == "muon" and r["baseline"] == "adamw · 60 steps")
    assert muon["resolved"] and muon["ratio_low"] > 1 and muon["every_width"]
    # the matched pair (AdamW 2× steps vs Dion 1/16, planted β_hard 0.33 vs 0.50) differs in geometry
    assert by["q2"]["verdict"] == "resolved" and "different representation" in by["q2"]["finding"]
    # Holm over 3 matched pairs (one per width) × 4 comparisons; the example is one that survived it
    assert "Holm-corrected over the 12 comparisons" in by["q2"]["finding"]
    assert by["q5"]["verdict"] == "not measured"  # no architecture axis in this sweep
    for a in answers:  # at the top of the page and of report.md, before the first question's section
        assert page.index(html.escape(a["finding"])) < page.index('id="q1"')
        assert md.index(f"*{a['verdict']}*") < md.index("## 1.")
    assert not any("highest" in f or "lowest" in f for f in data["summary"]["findings"])


def test_unresolved_difference_states_the_power_it_had(tmp_path):
    # two series with the same planted law and seed noise: neither the level nor β may be called different
    same = dataclasses.replace(DEFAULT_SERIES[0], label="adamw_b", optimizer="adamw")
    root = write_sweep(tmp_path, series=(DEFAULT_SERIES[0], same), widths=WIDTHS)
    files = build_report(root, n_resamples=200)
    data = json.loads(files.json.read_text(encoding="utf-8"))
    q1 = data["answers"][0]
    assert q1["verdict"] == "not resolved"
    assert "no β_hard difference survives" in q1["finding"]
    row = next(r for r in data["design"]["contrasts"] if r["bucket"] == "all" and r["metric"] == "hard_rank")
    # the MDE and the excluded differences it states are the design table's numbers
    assert f"80% power {row['mde']:.2f}" in q1["finding"]
    assert f"beyond {max(abs(row['low']), abs(row['high'])):.2f}" in q1["finding"]
    assert row["reference"] is None and "paper's gap" not in q1["finding"]  # one optimizer: no reference


def test_figure_titles_and_legends_fit_inside_the_figure(report):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from capscale.report.figures import FIGURES

    files = report[0]
    for name, (draw, _) in FIGURES.items():
        fig = draw(files.analysis)
        if fig is None:
            continue
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        renderer = canvas.get_renderer()
        texts = [fig._suptitle] + [
            t
            for ax in fig.axes
            for t in (
                ax.title,
                ax._left_title,
                ax._right_title,
                ax.xaxis.label,
                ax.yaxis.label,
                *(ax.get_legend().get_texts() if ax.get_legend() else []),
            )
        ]
        for t in texts:
            if t is None or not (t.get_visible() and t.get_text().strip()):
                continue
            ext = t.get_window_extent(renderer)
            assert ext.x0 >= fig.bbox.x0 - 1 and ext.x1 <= fig.bbox.x1 + 1, (name, t.get_text())
            assert ext.y0 >= fig.bbox.y0 - 1 and ext.y1 <= fig.bbox.y1 + 1, (name, t.get_text())


def test_single_run_is_titled_by_its_own_name(tmp_path):
    root = write_sweep(tmp_path / "sw", series=(DEFAULT_SERIES[2],), widths=WIDTHS)
    run = sorted((root / "runs").iterdir())[0]
    files = build_report(run, tmp_path / "out", n_resamples=200)
    data = json.loads(files.json.read_text(encoding="utf-8"))
    assert data["sweep"]["name"] == run.name
    assert f"<h1>capscale report — {run.name}</h1>" in files.html.read_text(encoding="utf-8")


def test_report_command_help_shows_the_analysis_defaults():
    from capscale.analysis import AnalysisParams, PhaseThresholds

    parser = argparse.ArgumentParser()
    report_command.add_arguments(parser)
    helps = {a.dest: a.help for a in parser._actions}
    assert helps["last_k"].endswith(f"(default {AnalysisParams().last_k})")
    assert helps["tolerance"].endswith(f"(default {AnalysisParams().tolerance:g})")
    assert helps["brittle_ratio"].endswith(f"(default {PhaseThresholds().brittle_ratio:g})")


def test_short_labels_drop_what_every_series_shares():
    from capscale.report.figures import short_labels

    labels, shared = short_labels(["adamw · pos=rope", "muon · pos=rope", "muon · 120 steps · pos=rope"])
    assert shared == "pos=rope"
    assert labels == {
        "adamw · pos=rope": "adamw",
        "muon · pos=rope": "muon",
        "muon · 120 steps · pos=rope": "muon · 120 steps",
    }
    labels, shared = short_labels(["adamw · pos=rope", "adamw · pos=none"])
    assert shared == "" and labels["adamw · pos=none"] == "adamw · pos=none"


def test_one_seed_sweep_shows_no_interval_over_seeds(tmp_path):
    one = [dataclasses.replace(s, seeds=(0,)) for s in (DEFAULT_SERIES[0], DEFAULT_SERIES[2])]
    root = write_sweep(tmp_path, series=one, widths=WIDTHS)
    data = json.loads(build_report(root, n_resamples=200).json.read_text(encoding="utf-8"))
    rows = [r for r in data["design"]["contrasts"] if r["bucket"] == "all"]
    assert rows and all(r["low"] is None and r["mde"] is None and not r["resolved"] for r in rows)
    assert all("no interval over seeds" in r["note"] for r in rows)
    for b in data["betas"]:  # no layer bootstrap presented as uncertainty
        for kind in ("soft", "hard", "delta"):
            assert b[f"beta_{kind}"]["boot_low"] is None and "one seed" in b[f"beta_{kind}"]["interval_over"]
    q1 = data["answers"][0]
    assert q1["verdict"] == "not resolved" and "one seed, so no interval over seeds" in q1["finding"]


MIN_AXES_PX = 100  # the narrowest (and lowest) a figure's panel may be drawn on a 1280-px-wide page


def _overlap(a, b, tol=0.005) -> bool:
    return a[0] < b[2] - tol and b[0] < a[2] - tol and a[1] < b[3] - tol and b[1] < a[3] - tol


def _legibility(files, tmp_path) -> dict:
    """Rendered in Chromium: every panel at least MIN_AXES_PX wide and high, no legend over another, none clipped,
    and a figure-level legend over no panel."""
    from capscale.report.figures import read_layout

    result = _render(files.html.read_text(encoding="utf-8"), tmp_path)
    problems = {}
    for name, path in files.figures.items():
        lay = read_layout(path.read_bytes())
        px = result["widths"][f"fig-{name}"]
        py = px * lay["height_in"] / lay["width_in"]  # the image keeps its aspect ratio
        narrow = [
            (round((x1 - x0) * px), round((y1 - y0) * py))
            for x0, y0, x1, y1 in lay["axes"]
            if min((x1 - x0) * px, (y1 - y0) * py) < MIN_AXES_PX
        ]
        legends = lay["legends"] + lay["figure_legends"]
        overlapping = [(i, j) for i in range(len(legends)) for j in range(i) if _overlap(legends[i], legends[j])]
        clipped = [lg for lg in legends if lg[0] < -0.01 or lg[1] < -0.01 or lg[2] > 1.01 or lg[3] > 1.01]
        covering = [lg for lg in lay["figure_legends"] if any(_overlap(lg, ax) for ax in lay["axes"])]
        if narrow or overlapping or clipped or covering:
            problems[name] = dict(narrow=narrow, overlapping=overlapping, clipped=clipped, covering=covering)
    return problems


@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless Chromium not installed")
@pytest.mark.parametrize("n_cells", [1, 12])
def test_figures_are_legible_at_2_and_24_series(tmp_path, n_cells):
    # 2 optimizers × n_cells cells (step budget × position encoding): 2 or 24 series
    budgets = (60, 120, 180, 240, 300, 360)
    cells = [(60, "rope")] if n_cells == 1 else [(b, p) for b in budgets for p in ("rope", "none")]
    seeds = (0, 1) if n_cells == 1 else (0,)  # one seed keeps the 24-series report quick to build
    series = [
        dataclasses.replace(s, steps=b, pos=p, seeds=seeds)
        for b, p in cells
        for s in (DEFAULT_SERIES[0], DEFAULT_SERIES[2])
    ]
    root = write_sweep(tmp_path / "sweep", series=series, widths=WIDTHS)
    files = build_report(root, n_resamples=100)
    data = json.loads(files.json.read_text(encoding="utf-8"))
    assert len(data["sweep"]["series"]) == 2 * n_cells and len(data["design"]["cells"]) == n_cells
    assert _legibility(files, tmp_path / "render") == {}


# their legends carry each panel's own numbers (β, or the ratio, with its interval), so one per panel
PANEL_LEGENDS = {"scaling", "levels"}


def test_several_panels_share_one_figure_level_legend(report):
    from capscale.report.figures import read_layout

    files = report[0]
    several = []
    for name, path in files.figures.items():
        lay = read_layout(path.read_bytes())
        if len(lay["axes"]) > 1 and name not in PANEL_LEGENDS:
            several.append(name)
            assert lay["legends"] == [] and len(lay["figure_legends"]) == 1, (name, lay)
    assert {"matched_loss", "asymmetry", "regimes", "bucket_loss", "loss_curves", "beta_trajectory"} <= set(several)
