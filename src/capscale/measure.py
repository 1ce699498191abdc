"""``capscale measure MODEL [--data TEXT_OR_DIR] [--tokens N] --out FILE``: post-hoc spectra of a saved model.

MODEL is a capscale run directory (its latest checkpoint), one capscale
checkpoint file (``checkpoints/step_XXXXXXXX.pt``), or a Hugging Face model
directory (``config.json`` + weights), loaded offline. The model's own tokenizer
(the run's, or the HF directory's) turns the local text into token ids. Without
``--data`` a capscale run is measured on its own held-out validation split, bucketed
by its training unigram table (the one its telemetry used): the same spectra as the
run's telemetry, but from as many tokens as asked for, so N/D can be made large.
Every layer and both sites are measured over all tokens at once (one
full-batch spectrum each), with HEAD/MID/TAIL buckets from the unigram counts
of the same text (or ``--freq-table``). The output has the ``spectra.parquet``
columns (``.parquet``, ``.jsonl`` or ``.csv``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capscale.rundir import CHECKPOINT_DIR, CONFIG_FILE, RunDir

TEXT_SUFFIXES = (".txt", ".md", ".text")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        help="a capscale run directory or checkpoint file, or a Hugging Face model directory "
        "(config.json + weights, loaded offline)",
    )
    parser.add_argument(
        "--data",
        default=None,
        help="a text file, or a directory of .txt/.md files (recursive); default for a capscale "
        "run: its validation split, with its training HEAD/MID/TAIL table",
    )
    parser.add_argument("--tokens", type=int, default=65536, help="measure the first N tokens (default 65536)")
    parser.add_argument("--out", required=True, help="output file: .parquet, .jsonl or .csv")
    parser.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="tokens per sequence (default: the model's context, at most 512)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default 8)")
    parser.add_argument(
        "--freq-table",
        default=None,
        help="HEAD/MID/TAIL from this FrequencyTable JSON (default: counts of the measured text)",
    )
    parser.add_argument("--sites", default="pre,post", help="comma-separated: pre, post (default both)")
    parser.add_argument("--layers", default="auto", help="'auto' or comma-separated layer indices")
    parser.add_argument(
        "--dtype",
        choices=("float64", "float32"),
        default="float64",
        help="covariance GEMM dtype (default float64)",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument(
        "--step",
        type=int,
        default=None,
        help="value of the step column (default: the checkpoint's step; 0 for a HF model)",
    )


def read_text(path: Path) -> list[str]:
    """The text of a file, or of every text file under a directory (sorted), one string each."""
    if path.is_file():
        return [path.read_text(encoding="utf-8", errors="replace")]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"no {'/'.join(TEXT_SUFFIXES)} files under {str(path)!r}")
        return [p.read_text(encoding="utf-8", errors="replace") for p in files]
    raise FileNotFoundError(f"--data {str(path)!r} does not exist")


@dataclass
class Loaded:
    """A model ready to measure, with what turns text into its token ids."""

    model: Any
    encode: Callable[[str], list[int]]
    eos_id: int | None
    vocab: int
    context: int | None
    step: int  # the checkpoint's training step (0 when unknown)
    # capscale runs: (first N validation tokens, training frequency table)
    held_out: Callable[[int], tuple[list[int], Any]] | None = None


def load_model(path: Path, device: str) -> Loaded:
    """A capscale run directory / checkpoint, or a HF directory; a clear error for anything else."""
    if path.is_file() and path.suffix == ".pt":
        return load_capscale(path.parent.parent, path, device)
    if (path / CHECKPOINT_DIR).is_dir() and (path / CONFIG_FILE).is_file():
        return load_capscale(path, None, device)
    if (path / "config.json").is_file():  # the HF model directory's own config.json
        return load_hf(path, device)
    raise ValueError(
        f"{str(path)!r} is neither a capscale run directory (config.json + checkpoints/), "
        "a capscale checkpoint (.pt) nor a Hugging Face model directory (config.json + weights)"
    )


def load_capscale(run_dir: Path, checkpoint: Path | None, device: str) -> Loaded:
    """Our GPT from a run's checkpoint (default: its latest), with the run's own tokenizer."""
    from capscale.train.checkpoint import list_checkpoints, load_checkpoint
    from capscale.train.data import tokenizer_for
    from capscale.train.model import GPT, GPTConfig
    from capscale.train.sources import make_source

    run = RunDir(run_dir)
    config = run.read_config()  # one line naming the file if it is not a JSON object
    if config is None:
        raise ValueError(f"{str(run_dir)!r} has no {CONFIG_FILE}: the checkpoint's run directory is needed")
    if checkpoint is None:
        found = list_checkpoints(run.checkpoint_dir)
        if not found:
            raise ValueError(f"run {str(run_dir)!r} has no checkpoint yet")
        checkpoint = found[-1][1]
    ckpt = load_checkpoint(checkpoint, config=config)  # validated against the run's config
    model = GPT(GPTConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    data = config["data"]
    tok = tokenizer_for(data["tokenizer"], make_source(data["source"]), cache_dir=data.get("cache_dir"))
    vocab = int(model.cfg.vocab_size)
    if tok.vocab_size > vocab:
        raise ValueError(
            f"the run's tokenizer ({data['tokenizer']}) has {tok.vocab_size} types but the model "
            f"only {vocab} embeddings: not the tokenizer this run was trained with"
        )

    def held_out(limit: int):
        from capscale.train.config import RunConfig
        from capscale.train.data import load_data

        split = load_data(RunConfig.from_dict({k: v for k, v in config.items() if k != "versions"}).data)
        return split.val_tokens[:limit].tolist(), split.frequency_table()

    return Loaded(model.to(device), tok.encode, tok.eot_id, vocab, int(model.cfg.seq_len), int(ckpt["step"]), held_out)


def load_hf(model_dir: Path, device: str) -> Loaded:
    """A HF causal LM and its tokenizer from a local directory, offline."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ValueError("`capscale measure` of a HF model needs transformers: pip install transformers") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"{str(model_dir)!r} has no usable tokenizer to read the text with: {exc}") from exc
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).to(device)
    context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    return Loaded(
        model,
        lambda text: tokenizer(text, add_special_tokens=False)["input_ids"],
        tokenizer.eos_token_id,
        int(model.get_input_embeddings().num_embeddings),
        context,
        0,
    )


def tokenize(texts: list[str], encode: Callable[[str], list[int]], eos_id: int | None, limit: int) -> list[int]:
    """Token ids of the texts, documents separated by EOS (when there is one), first ``limit``."""
    ids: list[int] = []
    for text in texts:
        ids += encode(text)
        if eos_id is not None:
            ids.append(eos_id)
        if len(ids) >= limit:
            break
    return ids[:limit]


def batches(ids: list[int], seq_len: int, batch_size: int, device: str):
    """``[B, S]`` token-id tensors; the tail shorter than ``seq_len`` forms a last ``[1, r]`` batch."""
    import torch

    t = torch.tensor(ids, dtype=torch.long)
    n = t.numel() // seq_len
    full = t[: n * seq_len].view(n, seq_len)
    out = [full[i : i + batch_size].to(device) for i in range(0, n, batch_size)]
    if t.numel() - n * seq_len >= 2:
        out.append(t[n * seq_len :].view(1, -1).to(device))
    return out


def run(args: argparse.Namespace) -> int:
    import torch

    from capscale.probe import measure_model, scalar_summary
    from capscale.probe.sinks import check_frame_path, write_frame
    from capscale.spectrum import FrequencyTable

    check_frame_path(args.out)  # before minutes of work, not after
    if args.tokens < 2:
        raise ValueError(f"--tokens must be >= 2, got {args.tokens}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    sites = tuple(s.strip() for s in args.sites.split(",") if s.strip())
    layers = "auto" if args.layers == "auto" else [int(x) for x in args.layers.split(",")]
    loaded = load_model(Path(args.model), args.device)
    vocab = loaded.vocab
    run_table = None
    if args.data is not None:
        ids = tokenize(read_text(Path(args.data)), loaded.encode, loaded.eos_id, args.tokens)
    elif loaded.held_out is not None:
        ids, run_table = loaded.held_out(args.tokens)
    else:
        raise ValueError("--data is needed for a Hugging Face model (a text file or directory to measure on)")
    if len(ids) < 2:
        source = f"--data {args.data!r}" if args.data is not None else "the run's validation split"
        raise ValueError(f"{source} gives {len(ids)} tokens; need at least 2")
    if max(ids) >= vocab:
        raise ValueError(f"the tokenizer produced id {max(ids)} but the model's vocabulary has {vocab} entries")
    if args.freq_table:
        table = FrequencyTable.load(args.freq_table)
    elif run_table is not None:
        table = run_table
    else:
        table = FrequencyTable.from_token_ids([ids], vocab_size=vocab)
    seq_len = args.seq_len or min(512, loaded.context or 512)
    if loaded.context is not None and seq_len > loaded.context:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's context of {loaded.context} tokens")
    frame = measure_model(
        loaded.model,
        batches(ids, seq_len, args.batch_size, args.device),
        freq_table=table,
        sites=sites,
        layers=layers,
        dtype=getattr(torch, args.dtype),
        step=loaded.step if args.step is None else args.step,
    )
    out = write_frame(frame, args.out)
    print(f"measured {len(ids)} tokens, {frame['layer'].nunique()} layers x {len(sites)} sites -> {out}")
    for key, value in scalar_summary(frame).items():
        print(f"  {key.split('/', 1)[1]:<28} {value:10.3f}")
    return 0
