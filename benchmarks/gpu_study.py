"""GPU study: the ``cpu-depth`` model at depth 6, FFN ×1–×16, AdamW and Muon, 2 seeds, several runs at once.

    python benchmarks/gpu_study.py --pack cache/             # where the corpus is: a cache to carry (~15 MB)
    CAPSCALE_HOME=cache bash benchmarks/gpu_study.sh --out runs/gpu-study   # on one GPU, no network
    bash benchmarks/gpu_study.sh --toy --out /tmp/gpu-study  # the same at toy size on the CPU (tests)

The model and data are the CPU depth study's (docs/preregistration/cpu-depth.md): d_model 64,
2 heads, 6 layers, sequence 128, 16 sequences a step, Shakespeare with byte-level BPE of
1,024 types, AdamW and Muon at the rates of the ``cpu-depth`` preset. Widths are ×1…×16
(64…1,024), seeds 0 and 1, and every width trains on 10 tokens per non-embedding parameter
of the ×4 model (1,760 steps; 16.9 tokens per parameter at ×1, 3.8 at ×16). Telemetry every
160 steps in 20-step windows (40,960 tokens, N/D >= 10 in every token bucket at width 1,024).

The 20 runs form one sweep directory (``--out``; re-running resumes it, as ``capscale
sweep`` does). ``--parallel`` worker processes share the GPU, each with its share of the
CPU threads. The device machine has no network: ``--pack DIR`` builds, on a machine that
has the corpus, a capscale cache (the corpus, its tokenizer and its token shard) to carry
there and point ``CAPSCALE_HOME`` at. At the end: each run's time and status, the wall
time against ``--budget-s`` (8 minutes), and β_hard, β_soft per optimizer and Δβ (Muon −
AdamW) at the final step, post-activation, all tokens. Exit status 1 if a run did not
finish or the study took longer than its budget.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

STEPS = 1760  # 10 x 360,448 non-embedding parameters (depth 6, x4) / 2,048 tokens per step
TOY_STEPS = 8


def study_spec(toy: bool, text: Path | None = None) -> dict:
    """The sweep spec (a dict for ``SweepSpec.from_dict``)."""
    from capscale.sweep.spec import CPU_DEPTH_LR

    optimizers = [{"name": o, "params": {"lr": lr}} for o, lr in CPU_DEPTH_LR.items()]
    base = {
        "model.d_model": 64,
        "model.n_head": 2,
        "model.n_layer": 6,
        "data.tokenizer": "bytebpe:1024",
        "train.eval_every": 160,
        "train.log_every": 20,
        "train.checkpoint_every": 880,
        "telemetry.every": 160,
        "telemetry.window": 20,
    }
    axes = {"ffn_mult": [1, 2, 4, 8, 16], "optimizer": optimizers, "seed": [0, 1], "steps": [STEPS]}
    if toy:  # seconds on one CPU core; a local text file, so nothing is fetched
        base.update(
            {
                "model.d_model": 16,
                "model.n_head": 1,
                "model.n_layer": 2,
                "model.seq_len": 16,
                "data.source": f"text:{text}",
                "data.tokenizer": "bytebpe:300",
                "train.batch_size": 4,
                "train.eval_every": 4,
                "train.eval_batches": 1,
                "train.log_every": 2,
                "train.checkpoint_every": 4,
                "telemetry.every": 4,
                "telemetry.window": 2,
            }
        )
        axes.update(ffn_mult=[1, 2, 4], seed=[0], steps=[TOY_STEPS])
    return {"name": "gpu-study-toy" if toy else "gpu-study", "base": "cpu", "base_config": base, "axes": axes}


def toy_text(path: Path, words: int = 20_000) -> Path:
    """A deterministic Zipf-distributed text (the toy study's corpus)."""
    rng = np.random.default_rng(0)
    vocab = ["".join(rng.choice(list("abcdefghij"), size=rng.integers(2, 7))) for _ in range(300)]
    ids = np.minimum(rng.zipf(1.3, size=words), len(vocab)) - 1
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [" ".join(vocab[i] for i in ids[j : j + 12]) for j in range(0, words, 12)]
    path.write_text("\n".join(lines) + "\n")
    return path


def pack(dest: Path) -> int:
    """Build a capscale cache at ``dest`` holding the default corpus, its 1,024-type BPE and token shard."""
    from capscale.train import corpus
    from capscale.train.data import DataConfig, load_data

    src = corpus.corpus_dir()
    if not src.is_dir():
        print(f"gpu_study: the corpus is not installed here; run {corpus.FETCH_COMMAND}", file=sys.stderr)
        return 2
    target = corpus.corpus_dir(dest)
    if not target.exists():
        shutil.copytree(src, target)
    os.environ["CAPSCALE_HOME"] = str(dest)
    data = load_data(DataConfig(tokenizer="bytebpe:1024"), log=print)
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    print(f"gpu_study: packed {data.shard.n_tokens:,} tokens into {dest} ({size / 1e6:.1f} MB)")
    return 0 if size <= 60e6 else 1


def run_parallel(pending: dict[str, Path], parallel: int, threads: int) -> dict[str, tuple[int, float]]:
    """Each pending run in its own worker process, ``parallel`` at a time; name -> (exit code, seconds)."""
    env = {**os.environ, "CAPSCALE_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    queue, active, done = list(pending.items()), {}, {}
    while queue or active:
        while queue and len(active) < parallel:
            name, run_dir = queue.pop(0)
            cmd = [sys.executable, "-m", "capscale.sweep.worker", str(run_dir)]
            active[name] = (subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL), time.perf_counter())
        time.sleep(0.2)
        for name, (proc, t0) in list(active.items()):
            if proc.poll() is not None:
                done[name] = (proc.returncode, time.perf_counter() - t0)
                print(f"  {name}: exit {proc.returncode} after {done[name][1]:.0f} s", flush=True)
                del active[name]
    return done


def summarize(out: Path) -> None:
    """β per optimizer and Δβ (Muon − AdamW) at the final shared step, post-activation, all tokens."""
    from capscale.analysis import beta_trajectories, load_sweep, pair_trajectories

    sweep = load_sweep(out)
    fits = beta_trajectories(sweep.spectra, sweep.runs)
    fits = fits[(fits["site"] == "post") & (fits["bucket"] == "all")]
    for (series, metric), g in fits.groupby(["series", "metric"], sort=True):
        if metric in ("hard_rank", "soft_rank"):
            last = g.iloc[-1]
            print(
                f"  {series}: β {metric.split('_')[0]} {last['beta']:.2f} [{last['ci_low']:.2f}, {last['ci_high']:.2f}]"
            )
    pairs = pair_trajectories(sweep.spectra, sweep.runs)
    pairs = pairs[(pairs["site"] == "post") & (pairs["bucket"] == "all")]
    for (a, b, metric), g in pairs.groupby(["series_a", "series_b", "metric"], sort=True):
        last = g.sort_values("step").iloc[-1]
        print(
            f"  Δβ_{metric} {a} − {b} at step {int(last['step'])}: "
            f"{last['dbeta']:.2f} [{last['dbeta_low']:.2f}, {last['dbeta_high']:.2f}]"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/gpu-study"), help="the sweep directory (resumed if there)")
    ap.add_argument("--toy", action="store_true", help="CPU, toy model, a few steps: a smoke test of this script")
    ap.add_argument(
        "--pack", type=Path, metavar="DIR", help="build a capscale cache to carry to the GPU machine, then exit"
    )
    ap.add_argument("--parallel", type=int, default=None, help="runs at once (default 10; toy 3)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="the study's wall-time budget (default 8 minutes)")
    args = ap.parse_args(argv)
    if args.pack is not None:
        return pack(args.pack)

    import torch

    from capscale.sweep.spec import SweepSpec
    from capscale.sweep.sweep import _prepare_data, pending_runs, plan

    parallel = args.parallel or (3 if args.toy else 10)
    if not args.toy and not torch.cuda.is_available():
        print("gpu_study: no CUDA device (use --toy on a CPU)", file=sys.stderr)
        return 2
    text = toy_text(args.out.parent / f"{args.out.name}-corpus.txt") if args.toy else None
    spec = SweepSpec.from_dict(study_spec(args.toy, text))
    threads = max(1, (os.cpu_count() or 1) // parallel)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.toy else "cpu"
    t0 = time.perf_counter()
    runs = plan(spec, args.out)
    pending = pending_runs(spec, runs)
    print(
        f"gpu_study: {len(runs)} runs, {len(pending)} to run, {parallel} at a time on {device}, {threads} thread(s) each"
    )
    if pending:
        _prepare_data(spec, print)
    if args.toy:  # the toy runs stay on the CPU even where a GPU is visible
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    done = run_parallel(pending, parallel, threads)
    wall = time.perf_counter() - t0
    failed = [n for n, (rc, _) in done.items() if rc != 0]
    print(
        f"gpu_study: {len(done) - len(failed)} of {len(pending)} runs finished in {wall:.0f} s (budget {args.budget_s:.0f} s)"
    )
    summarize(args.out)
    ok = not failed and (args.toy or wall <= args.budget_s)
    if failed:
        print(f"gpu_study: did not finish: {', '.join(failed)}")
    print("gpu_study: ok" if ok else "gpu_study: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
