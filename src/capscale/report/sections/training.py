"""Training: loss curves and rank trajectories (``report.json`` key ``training``; figures
``loss_curves`` and ``rank_trajectories``). Q2 and Q4 read its final validation losses."""

from __future__ import annotations

from capscale.analysis import Analysis
from capscale.report.format import Section, get, table
from capscale.report.records import jsonable, records

KEY = "training"
FIGURES = ("loss_curves", "rank_trajectories")
_FINAL = [
    "run_id",
    "series",
    "width",
    "seed",
    "final_val_loss",
    "final_val_loss_head",
    "final_val_loss_mid",
    "final_val_loss_tail",
]


def data(a: Analysis) -> dict:
    return jsonable({"final": records(a.sweep.runs, _FINAL)})


def section(d: dict) -> Section:
    cols = [
        ("run", get("run_id")),
        ("series", get("series")),
        ("width", get("width")),
        ("seed", get("seed")),
        ("val loss", get("final_val_loss", 4)),
        ("HEAD", get("final_val_loss_head", 4)),
        ("MID", get("final_val_loss_mid", 4)),
        ("TAIL", get("final_val_loss_tail", 4)),
    ]
    return Section(
        "training",
        "Training: loss curves and rank trajectories",
        [
            (
                "{fig:loss_curves} shows the loss curves; the rank trajectories ({fig:rank_trajectories}: ranks per "
                "unit width over training, median over layers) show whether the final aggregate was taken on a "
                "plateau or while ranks were still moving."
            ),
        ],
        list(FIGURES),
        [table("Final validation losses per run.", cols, d[KEY]["final"], collapsed=True)],
    )
