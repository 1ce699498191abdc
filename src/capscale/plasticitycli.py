"""``capscale plasticity RUNS --data CORPUS --steps K --out DIR``: continue finished runs on a
second domain and relate their adaptation to their capacity at the end of pretraining.

RUNS: run directories, or sweep directories (their ``runs/*``). Each finished run with a
checkpoint is continued into ``DIR/runs/<run name>`` (``capscale.train.plasticity``); one
already continued there is kept (re-running resumes the set). Then prints each run's
adaptation, forgetting and change of capacity, and the relation across the runs
(``capscale.analysis.plasticity``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUNS", help="finished run directories, or sweep directories")
    parser.add_argument(
        "--data", required=True, help="the second corpus: text:PATH, a .txt file or directory, jsonl:PATH, ..."
    )
    parser.add_argument("--steps", type=int, required=True, help="K: steps on the second corpus")
    parser.add_argument("--out", required=True, help="directory of the continued runs")
    parser.add_argument("--lr-scale", type=float, default=1.0, help="× the run's base learning rates (default 1)")
    parser.add_argument("--eval-every", type=int, default=None, help="evaluation cadence (default K // 5)")
    parser.add_argument("--max-tokens", type=int, default=None, help="read at most this many tokens of the corpus")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--last-k", type=int, default=5, help="logged steps per layer in the pretraining aggregate")


def _run_dirs(paths: list[str]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise FileNotFoundError(f"no such run or sweep directory: {p}")
        out += sorted(d for d in (p / "runs").iterdir() if d.is_dir()) if (p / "runs").is_dir() else [p]
    return out


def run(args: argparse.Namespace) -> int:
    from capscale.analysis.plasticity import load_plasticity, plasticity_relation, plasticity_table
    from capscale.rundir import RunDir, RunStatus
    from capscale.train.checkpoint import list_checkpoints
    from capscale.train.plasticity import SUMMARY_FILE, PlasticityConfig, continue_run

    config = PlasticityConfig(
        steps=args.steps, lr_scale=args.lr_scale, eval_every=args.eval_every, max_tokens=args.max_tokens
    )
    out = Path(args.out)
    skipped = []
    for run_dir in _run_dirs(args.runs):
        status = RunDir(run_dir).read_status() or {}
        if status.get("status") != RunStatus.DONE or not list_checkpoints(RunDir(run_dir).checkpoint_dir):
            skipped.append(f"{run_dir.name} ({status.get('status', 'no status')}, or no checkpoint)")
            continue
        target = out / "runs" / run_dir.name
        if (target / SUMMARY_FILE).is_file():
            continue
        if target.exists():  # an interrupted continuation: start it again
            import shutil

            shutil.rmtree(target)
        print(f"{run_dir.name}: {args.steps} steps on {args.data}", flush=True)
        continue_run(run_dir, args.data, target, config, device=args.device)
    if skipped:
        print("skipped: " + "; ".join(skipped), file=sys.stderr)
    table = plasticity_table(load_plasticity(out), last_k=args.last_k)
    cols = [
        "run_id", "label", "ffn_width", "seed", "pre_hard_rank", "pre_val_loss",
        "auc_new", "adaptation", "forgetting", "d_post_hard_rank", "d_post_dormant_frac",
    ]  # fmt: skip
    print(table[[c for c in cols if c in table]].sort_values(["label", "ffn_width", "seed"]).to_string(index=False))
    print("\nadaptation (auc_new: mean new-domain loss over the K steps; lower = faster) on log pretraining hard rank,")
    print("at matched pretraining loss, 95% intervals (clustered by seed where there are several seeds):")
    for r in plasticity_relation(table).itertuples():
        if r.note:
            print(f"  {r.kind:<7} not estimable: {r.note} (n {r.n})")
        else:
            how = "clustered by seed" if r.n_seeds > 1 else "one seed: plain OLS"
            print(
                f"  {r.kind:<7} slope {r.slope:.4f} [{r.ci_low:.4f}, {r.ci_high:.4f}]  n {r.n}, {r.n_seeds} seed(s), {how}"
            )
    return 0
