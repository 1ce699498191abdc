"""``capscale plasticity RUNS --data CORPUS --steps K --out DIR``: continue finished runs on a
second domain and relate their adaptation to their capacity at the end of pretraining.

RUNS: run directories, sweep directories (their ``runs/*``), or Hugging Face model
directories (``config.json`` + weights, loaded as ``capscale measure`` loads them). Each
finished run with a checkpoint is continued into ``DIR/runs/<run name>``
(``capscale.train.plasticity``) with its own optimizer and state; a Hugging Face model with a
fresh AdamW (``--lr``; the directory holds no optimizer state), forgetting measured on
``--orig-data`` where given. One already continued there is kept (re-running resumes the
set). Then prints each run's adaptation, forgetting and change of capacity, and the relation
across the capscale runs (``capscale.analysis.plasticity``).
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
    hf = parser.add_argument_group("Hugging Face model directories (no optimizer state: a fresh AdamW)")
    hf.add_argument("--orig-data", default=None, help="the model's original domain, for forgetting (default: none)")
    hf.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate, constant (default 1e-4)")
    hf.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    hf.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: context, at most 128)")
    hf.add_argument("--seed", type=int, default=0, help="order of the training windows (default 0)")


def _run_dirs(paths: list[str]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise FileNotFoundError(f"no such run or sweep directory: {p}")
        out += sorted(d for d in (p / "runs").iterdir() if d.is_dir()) if (p / "runs").is_dir() else [p]
    return out


def is_hf_dir(path: Path) -> bool:
    """A Hugging Face model directory: its config.json and weights, no capscale status.json."""
    weights = any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))
    return (path / "config.json").is_file() and weights and not (path / "status.json").exists()


def _continue_hf(model_dir: Path, target: Path, args, config) -> None:
    from capscale.measure import check_device, load_hf
    from capscale.train.plasticity import HFOptions, continue_hf

    options = HFOptions(lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed)
    loaded = load_hf(model_dir, check_device(args.device))
    if loaded.encoder_decoder:
        raise ValueError(f"{model_dir}: an encoder-decoder; plasticity continues causal language models")
    print(f"{model_dir.name}: {args.steps} steps on {args.data} with {options.describe()}", flush=True)
    continue_hf(
        loaded.model,
        loaded.encode,
        loaded.eos_id,
        args.data,
        target,
        config,
        options,
        model_dir=model_dir,
        context=loaded.context,
        orig_data=args.orig_data,
        device=args.device,
    )


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
        target = out / "runs" / run_dir.name
        if is_hf_dir(run_dir):
            if not (target / SUMMARY_FILE).is_file():
                if target.exists():
                    import shutil

                    shutil.rmtree(target)
                _continue_hf(run_dir, target, args, config)
            continue
        status = RunDir(run_dir).read_status() or {}
        if status.get("status") != RunStatus.DONE or not list_checkpoints(RunDir(run_dir).checkpoint_dir):
            skipped.append(f"{run_dir.name} ({status.get('status', 'no status')}, or no checkpoint)")
            continue
        if (target / SUMMARY_FILE).is_file():
            continue
        if target.exists():  # an interrupted continuation: start it again
            import shutil

            shutil.rmtree(target)
        print(f"{run_dir.name}: {args.steps} steps on {args.data}", flush=True)
        continue_run(run_dir, args.data, target, config, device=args.device)
    if skipped:
        print("skipped: " + "; ".join(skipped), file=sys.stderr)
    results = load_plasticity(out)
    kind = results["kind"] if "kind" in results else "capscale"
    hf = results[kind == "huggingface"]
    if len(hf):
        print("Hugging Face models (" + "; ".join(sorted(set(hf["optimizer"]))) + "):")
        cols = ["run_id", "label", "steps", "val_loss_new_0", "auc_new", "adaptation", "forgetting"]
        cols += ["post_hard_rank_0", "d_post_hard_rank", "post_dormant_frac_0", "d_post_dormant_frac"]
        print(hf[[c for c in cols if c in hf]].to_string(index=False))
        if hf["forgetting"].isna().any():
            print("forgetting: not measured where no --orig-data was given (a model directory does not say its corpus)")
    own = results[kind != "huggingface"]
    if own.empty:
        return 0
    table = plasticity_table(own, last_k=args.last_k)
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
