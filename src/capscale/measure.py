"""``capscale measure MODEL... [--data TEXT_OR_DIR] [--tokens N] --out FILE``: post-hoc spectra of saved models.

MODEL is a capscale run directory (its latest checkpoint), one capscale
checkpoint file (``checkpoints/step_XXXXXXXX.pt``), a Hugging Face model
directory (``config.json`` + weights, loaded offline with the class it was
saved as: causal LM, masked LM, encoder, encoder-decoder; the base model when
the head's weights are absent), or a directory of such directories (e.g. a
training run's ``checkpoint-N`` revisions, or a capscale run's ``checkpoints/``). Several models go into one table
with a ``model`` column. The model's own tokenizer (the run's, or the HF
directory's) turns the local text into token ids, each sequence framed as the
model expects (``[CLS] … [SEP]`` for BERT). Without ``--data`` a capscale run
is measured on its own held-out validation split, bucketed by its training
unigram table (the one its telemetry used). Every layer and both sites are
measured over all tokens at once (one full-batch spectrum each), with
HEAD/MID/TAIL buckets from the unigram counts of the same text (or
``--freq-table``). Sites are found by structure (docs/models.md) or named
with ``--site pre=PATTERN --site post=PATTERN:input``. Every argument is
checked before a model is loaded. The output has the ``spectra.parquet``
columns plus ``model`` (``.parquet``, ``.jsonl`` or ``.csv``).
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capscale.rundir import CHECKPOINT_DIR, CONFIG_FILE, RunDir

TEXT_SUFFIXES = (".txt", ".md", ".text")
_SITE_ARG = re.compile(r"(pre|post)=(.+?)(?::(input|output))?")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        nargs="+",
        help="capscale run directories or checkpoint files, Hugging Face model directories "
        "(config.json + weights, loaded offline), or directories of them (a run's checkpoint-N "
        "revisions, a capscale run's checkpoints/): all measured into one table with a model column",
    )
    parser.add_argument(
        "--data",
        default=None,
        help="a UTF-8 text file, or a directory of .txt/.md/extension-less text files (recursive); "
        "default for a capscale run: its validation split, with its training HEAD/MID/TAIL table",
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
    parser.add_argument(
        "--site",
        action="append",
        default=None,
        metavar="SITE=PATTERN[:input]",
        help="name a site explicitly, as attach's sites=: e.g. "
        "--site pre=encoder.layer.{layer}.intermediate.dense "
        "--site post=encoder.layer.{layer}.output.dense:input (':input' = the module's input; "
        "default: output for pre, input for post)",
    )
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
        help="value of the step column (default: the checkpoint's step; for a HF directory its "
        "trainer_state.json global_step or the N of checkpoint-N, else 0)",
    )


def _text_of(path: Path) -> str:
    """A file's text: UTF-8 only (binary or Latin-1 data would be measured as replacement characters)."""
    data = path.read_bytes()
    if b"\x00" in data:
        raise ValueError(f"--data file {str(path)!r} is binary (it holds NUL bytes), not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"--data file {str(path)!r} is not UTF-8 text (byte {exc.start}: {data[exc.start : exc.start + 1]!r}); "
            "convert it, e.g. iconv -f latin1 -t utf-8"
        ) from None


def _is_text_name(p: Path) -> bool:
    return not p.name.startswith(".") and (p.suffix.lower() in TEXT_SUFFIXES or p.suffix == "")


def read_text(path: Path) -> list[str]:
    """The text of a file, or of every text file under a directory (sorted), one string each."""
    if path.is_file():
        return [_text_of(path)]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _is_text_name(p.relative_to(path)))
        if not files:
            raise ValueError(f"no {'/'.join(TEXT_SUFFIXES)} or extension-less files under {str(path)!r}")
        return [_text_of(p) for p in files]
    raise FileNotFoundError(f"--data {str(path)!r} does not exist")


def parse_sites(args: argparse.Namespace) -> Any:
    """``--site``s as attach's ``sites=`` mapping, else the ``--sites`` names; one clear line for a bad one."""
    from capscale.probe.sites import SITE_NAMES, SiteSpec

    if not args.site:
        names = tuple(s.strip() for s in args.sites.split(",") if s.strip())
        bad = [s for s in names if s not in SITE_NAMES]
        if bad or not names:
            raise ValueError(f"--sites {args.sites!r}: sites are {', '.join(SITE_NAMES)}")
        return names
    out: dict[str, Any] = {}
    for raw in args.site:
        m = _SITE_ARG.fullmatch(raw)
        if not m:
            raise ValueError(f"--site {raw!r}: expected pre=PATTERN or post=PATTERN[:input|:output]")
        site, pattern, capture = m.groups()
        if pattern.count("{layer}") != 1:
            raise ValueError(f"--site {raw!r}: the pattern must contain {{layer}} once, where the layer index goes")
        if site in out:
            raise ValueError(f"--site {site} is given twice")
        out[site] = SiteSpec(pattern, capture or ("output" if site == "pre" else "input"))
    return out


def parse_layers(text: str):
    if text == "auto":
        return "auto"
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--layers {text!r}: expected 'auto' or comma-separated layer indices") from None


def check_device(name: str) -> str:
    """A torch device this machine has, or one clear line."""
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a torch device (cpu, cuda, cuda:1, mps, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: this machine has no CUDA device (torch sees none)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "meta":
        raise ValueError(f"--device {name!r} holds no weights (shapes only): measure on cpu, cuda or mps")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name!r}: MPS is not available on this machine")
    return name


def _natural(p: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


def expand_models(paths: list[str]) -> list[Path]:
    """Each model path, with a directory of model directories (a run's revisions) expanded in step order."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(f"model {raw!r} does not exist")
        if path.is_dir() and not (path / "config.json").is_file():
            subs = sorted((p for p in path.iterdir() if (p / "config.json").is_file()), key=_natural)
            # a capscale run's checkpoints/ directory: every checkpoint, in step order
            subs = subs or sorted((p for p in path.glob("*.pt") if p.is_file()), key=_natural)
            if subs:
                out += subs
                continue
        out.append(path)
    return out


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
    # special tokens framing each sequence ([CLS] … [SEP]), and how many it adds
    frame: Callable[[list[int]], list[int]] | None = None
    n_special: int = 0
    encoder_decoder: bool = False


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


def _hf_step(model_dir: Path) -> int:
    """The training step of a HF checkpoint: trainer_state.json's global_step, else N of checkpoint-N, else 0."""
    state = model_dir / "trainer_state.json"
    if state.is_file():
        try:
            return int(json.loads(state.read_text())["global_step"])
        except (ValueError, KeyError, TypeError):
            pass
    m = re.search(r"(\d+)$", model_dir.name)
    return int(m.group(1)) if m and "checkpoint" in model_dir.name else 0


def _hf_class(model_dir: Path):
    """The class the directory was saved as (its config's ``architectures``), else ``AutoModel``."""
    import transformers

    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{str(model_dir / 'config.json')!r} is not readable JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{str(model_dir / 'config.json')!r} is not a JSON object")
    names = config.get("architectures")
    for name in names if isinstance(names, list) else []:
        try:
            cls = getattr(transformers, str(name), None)
        except Exception:  # noqa: BLE001 — a lazy attribute whose backend is missing
            cls = None
        # only a model class: "logging" or "AutoConfig" are attributes of transformers too
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    return transformers.AutoModel


def load_hf(model_dir: Path, device: str) -> Loaded:
    """A HF model and its tokenizer from a local directory, offline, as the class it was saved as."""
    import pickle

    try:
        import transformers
        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:
        raise ValueError("`capscale measure` of a HF model needs transformers: pip install transformers") from exc
    cls = _hf_class(model_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"{str(model_dir)!r} has no usable tokenizer to read the text with: {exc}") from exc
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # a missing head is handled below, not warned about
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        model, info = cls.from_pretrained(model_dir, local_files_only=True, output_loading_info=True)
        if info.get("missing_keys") and cls is not AutoModel:
            # The head's weights are absent (e.g. a sentence-embedding BertModel saved under a
            # *ForMaskedLM name): measure the base model, which is all there is.
            model, info = AutoModel.from_pretrained(model_dir, local_files_only=True, output_loading_info=True)
        if info.get("missing_keys"):
            raise ValueError(f"weights missing for {sorted(info['missing_keys'])[:5]}")
    except (
        OSError,
        ValueError,
        RuntimeError,
        TypeError,
        AttributeError,
        ImportError,
        KeyError,
        pickle.UnpicklingError,
    ) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{str(model_dir)!r}: cannot load the model ({type(exc).__name__}: {first})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()
    if getattr(model, "main_input_name", "input_ids") != "input_ids":
        raise ValueError(
            f"{str(model_dir)!r} holds a {type(model).__name__}, which reads {model.main_input_name}, "
            "not token ids: capscale measure feeds text"
        )
    model = model.to(device)
    cfg = model.config
    context = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    prefix, suffix = _special_frame(tokenizer)

    def encode(text: str) -> list[int]:
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # "longer than the model's maximum": it is chunked
        try:
            return tokenizer(text, add_special_tokens=False)["input_ids"]
        finally:
            transformers.logging.set_verbosity(verbosity)

    return Loaded(
        model,
        encode,
        tokenizer.eos_token_id,
        int(model.get_input_embeddings().num_embeddings),
        context,
        _hf_step(model_dir),
        frame=(lambda ids: prefix + ids + suffix) if prefix or suffix else None,
        n_special=len(prefix) + len(suffix),
        encoder_decoder=bool(getattr(cfg, "is_encoder_decoder", False)),
    )


def _special_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after one sequence ([CLS] … [SEP], <s> …, … </s>)."""
    probe = "capscale measures this"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for k in range(len(full) - len(bare) + 1):
        if full[k : k + len(bare)] == bare:
            return list(full[:k]), list(full[k + len(bare) :])
    return [], []  # the special tokens interleave with the text: none are added


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


def sequences(ids: list[int], seq_len: int, frame=None, n_special: int = 0) -> list[list[int]]:
    """Chunks of ``seq_len - n_special`` ids, each framed by the model's special tokens; a tail of >= 2 kept."""
    body = seq_len - n_special
    if body < 1:
        raise ValueError(f"--seq-len {seq_len} leaves no room for text beside the model's {n_special} special tokens")
    chunks = [ids[i : i + body] for i in range(0, len(ids), body)]
    if chunks and len(chunks[-1]) + n_special < 2:
        chunks.pop()
    return [frame(c) if frame else c for c in chunks]


def batches(ids, seq_len: int, batch_size: int, device: str, *, frame=None, n_special=0, encoder_decoder=False):
    """``[B, S]`` token-id tensors (or seq2seq keyword batches); a shorter tail forms a last ``[1, r]`` batch."""
    import torch

    seqs = sequences(list(ids), seq_len, frame, n_special)
    out = []
    i = 0
    while i < len(seqs):
        same = [s for s in seqs[i : i + batch_size] if len(s) == len(seqs[i])]
        t = torch.tensor(same, dtype=torch.long, device=device)
        # An encoder-decoder reads the same text on both sides: both stacks are measured on it.
        out.append({"input_ids": t, "decoder_input_ids": t} if encoder_decoder else t)
        i += len(same)
    return out


def _check_args(args: argparse.Namespace) -> None:
    if args.tokens < 2:
        raise ValueError(f"--tokens must be >= 2, got {args.tokens}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.seq_len is not None and args.seq_len < 2:
        raise ValueError(f"--seq-len must be >= 2, got {args.seq_len}")


def _load_table(path: str):
    from capscale.spectrum import FrequencyTable

    try:
        return FrequencyTable.load(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"--freq-table {path!r} is not a readable capscale frequency table ({exc})") from None


def measure_one(path: Path, args: argparse.Namespace, texts, sites, layers, given_table):
    """One model's spectra frame (with a ``model`` column) and the number of tokens measured."""
    import torch

    from capscale.probe import measure_model
    from capscale.spectrum import FrequencyTable

    loaded = load_model(path, args.device)
    if any(p.is_meta for p in loaded.model.parameters()):
        raise ValueError(f"{str(path)!r}: the model's weights are on the meta device (shapes only, never loaded)")
    vocab = loaded.vocab
    run_table = None
    if texts is not None:
        ids = tokenize(texts, loaded.encode, loaded.eos_id, args.tokens)
    elif loaded.held_out is not None:
        ids, run_table = loaded.held_out(args.tokens)
    else:
        raise ValueError(f"--data is needed for the Hugging Face model {str(path)!r} (a text file or directory)")
    if len(ids) < 2:
        source = f"--data {args.data!r}" if args.data is not None else "the run's validation split"
        raise ValueError(f"{source} gives {len(ids)} tokens; need at least 2")
    seq_len = args.seq_len or min(512, loaded.context or 512)
    if loaded.context is not None and seq_len > loaded.context:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's context of {loaded.context} tokens")
    data = batches(
        ids,
        seq_len,
        args.batch_size,
        args.device,
        frame=loaded.frame,
        n_special=loaded.n_special,
        encoder_decoder=loaded.encoder_decoder,
    )
    seen = [int(x) for b in data for x in (b["input_ids"] if isinstance(b, dict) else b).reshape(-1).tolist()]
    if max(seen) >= vocab:
        raise ValueError(f"the tokenizer produced id {max(seen)} but the model's vocabulary has {vocab} entries")
    if given_table is not None:
        table = given_table
    elif run_table is not None:
        table = run_table
    else:  # counts of what the model reads, special tokens included
        table = FrequencyTable.from_token_ids([seen], vocab_size=vocab)
    frame = measure_model(
        loaded.model,
        data,
        freq_table=table,
        sites=sites,
        layers=layers,
        dtype=getattr(torch, args.dtype),
        step=loaded.step if args.step is None else args.step,
    )
    frame.insert(0, "model", str(path))
    return frame, len(seen)


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from capscale.probe import scalar_summary
    from capscale.probe.sinks import check_frame_path, write_frame

    # Every argument is checked before any model is loaded or anything written.
    check_frame_path(args.out)
    _check_args(args)
    sites = parse_sites(args)
    layers = parse_layers(args.layers)
    check_device(args.device)
    models = expand_models(args.model)
    if args.data is None:
        hf = [p for p in models if (p / "config.json").is_file() and not (p / "checkpoints").is_dir()]
        if hf:
            raise ValueError(f"--data is needed for the Hugging Face model {str(hf[0])!r} (a text file or directory)")
    texts = read_text(Path(args.data)) if args.data is not None else None
    given_table = _load_table(args.freq_table) if args.freq_table else None
    frames = []
    for path in models:
        frame, n = measure_one(path, args, texts, sites, layers, given_table)
        frames.append(frame)
        stacks = frame["stack"].nunique()
        where = f"{frame['layer'].nunique()} layers" + (f" x {stacks} stacks" if stacks > 1 else "")
        print(f"{path}: measured {n} tokens, {where} x {frame['site'].nunique()} sites")
    frame = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    out = write_frame(frame, args.out)
    print(f"-> {out}")
    if len(frames) == 1:
        for key, value in scalar_summary(frame).items():
            print(f"  {key.split('/', 1)[1]:<28} {value:10.3f}")
    return 0
