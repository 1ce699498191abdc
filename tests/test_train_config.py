"""`capscale train`: every bad config is one clear line, refused before a run directory exists.

In-process (``capscale.cli.main``): the refusal comes before any data or model is loaded,
so these need no corpus and no subprocess.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from capscale.cli import main
from capscale.train.config import PRESETS, RunConfig, TelemetryConfig, TrainConfig, resolve

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="refused only where CUDA is missing")

BAD_OVERRIDES = [
    ("steps=true", r"train.steps must be an integer, got True"),
    ("train.batch_size=true", r"train.batch_size must be an integer, got True"),
    ("train.steps=null", r"train.steps must be an integer, got None"),
    ("seed=1.5", r"train.seed must be an integer, got 1.5"),
    ("seed=-1", r"train.seed must be >= 0, got -1"),
    ('telemetry.every="5"', r"telemetry.every must be an integer, got '5'"),
    ("train.warmdown_frac=x", r"train.warmdown_frac must be a finite number, got 'x'"),
    ("train.warmdown_frac=1.5", r"train.warmdown_frac must be in \[0, 1\]"),
    ("train.device=bogus", r"train.device must be auto, cpu, cuda, cuda:N or mps, got 'bogus'"),
    ("train.schedule=linear", r"train.schedule must be one of 'warmdown', 'cosine', 'constant', got 'linear'"),
    ("train.dtype=float16", r"train.dtype must be one of 'float32', 'bfloat16'"),
    ("train.micro_batch_size=3", r"train.batch_size \(8\) must be a multiple of micro_batch_size \(3\)"),
    ("train.grad_clip=0", r"train.grad_clip must be > 0 or null"),
    ("train.progress=1", r"train.progress must be true or false, got 1"),
    ("train.nope=1", r"unknown config key\(s\) \['train.nope'\]"),
    ('telemetry.sites=["pre", "mid"]', r"telemetry.sites must be a list of \(one of 'pre', 'post'\)"),
    ('telemetry.sites="pre"', r"telemetry.sites must be a list of"),
    ("telemetry.sites=[]", r"telemetry.sites must be a non-empty list"),
    ("telemetry.window=20", r"telemetry.window \(20\) must not exceed telemetry.every \(10\)"),
    ("telemetry.dtype=bfloat16", r"telemetry.dtype must be one of 'float32', 'float64' or null"),
    ("telemetry.enabled=yes", r"telemetry.enabled must be true or false, got 'yes'"),
    ("telemetry.background=gpu", r"telemetry.background must be true or false or one of 'device', 'host', got 'gpu'"),
    ("data.val_fraction=x", r"data.val_fraction must be a number in \(0, 1\), got 'x'"),
    ("optimizer=lion", r"unknown optimizer 'lion'"),
    ("optimizer.params=3", r"optimizer.params must be a table/mapping, got 3"),
    ("optimizer.params.rank_fraction=0.5", r"unknown hyperparameter"),
    ("lr=-1", r"AdamWConfig.lr must be a number"),
    ("model=3", r"config section model must be a table/mapping"),
    ("model.ffn_width=0", r"FFN width must be"),
    pytest.param("train.device=cuda", r"train.device=cuda, but CUDA is not available", marks=no_cuda),
    pytest.param(
        "train.dtype=bfloat16", r"train.dtype=bfloat16 is bf16 autocast on CUDA; on CPU use float32", marks=no_cuda
    ),
]


@pytest.mark.parametrize("override, match", BAD_OVERRIDES)
def test_bad_override_is_one_line_and_writes_nothing(tmp_path, capsys, override, match):
    out = tmp_path / "run"
    assert main(["train", "--preset", "smoke", "--set", override, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("capscale train: error: ") and err.count("\n") == 1, err
    assert pytest.importorskip("re").search(match, err), err
    assert not out.exists()


BAD_FILES = [
    (
        "c.yaml",
        "train: !!python/object/apply:os.system ['true']\n",
        r"config file .*c\.yaml cannot be read: .*yaml\.safe_load",
    ),
    ("c.toml", "[train\nsteps = 3\n", r"config file .*c\.toml cannot be read"),
    ("c.json", "{not json", r"config file .*c\.json cannot be read"),
    ("c.json", "[1, 2]", r"config file .*c\.json must hold a table of keys"),
    ("c.yaml", b"name: \xff\xfe\n", r"config file .*c\.yaml is not UTF-8 text"),
    ("c.ini", "x=1", r"config file must be \.toml, \.yaml/\.yml or \.json, got c\.ini"),
    ("c.toml", "[train]\nsteps = true\n", r"train.steps must be an integer, got True"),
]


@pytest.mark.parametrize("name, text, match", BAD_FILES)
def test_bad_config_file_is_one_line_naming_it(tmp_path, capsys, name, text, match):
    path, out = tmp_path / name, tmp_path / "run"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert main(["train", "--config", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and pytest.importorskip("re").search(match, err), err
    assert not out.exists()


def test_configs_check_themselves_when_built_directly():
    with pytest.raises(ValueError, match="train.steps must be an integer"):
        TrainConfig(steps=True)
    with pytest.raises(ValueError, match="telemetry.every must be an integer"):
        TelemetryConfig(every=2.0)
    assert TelemetryConfig(sites=["post"]).sites == ("post",)  # lists from TOML/JSON
    assert TrainConfig(warmdown_frac=0).warmdown_frac == 0  # an int is a number


def test_every_preset_resolves_and_model_is_a_gpt_config():
    for name in PRESETS:
        cfg = resolve(name)
        assert dataclasses.is_dataclass(cfg.model) and type(cfg.model).__name__ == "GPTConfig"
        again = RunConfig.from_dict(cfg.to_dict())
        assert again.to_dict() == cfg.to_dict()


def test_with_vocab_leaves_the_config_as_it_was():
    cfg = resolve("smoke")
    vocab = cfg.model.vocab_size
    other = cfg.with_vocab(512)
    assert other.model.vocab_size == 512 and cfg.model.vocab_size == vocab


@pytest.mark.parametrize("kind", [TrainConfig, TelemetryConfig])
def test_no_integer_or_number_field_takes_a_boolean(kind):
    """Booleans are ints to Python, never to a config: each int/float field refuses True."""
    import typing

    hints = typing.get_type_hints(kind)
    numeric = [
        f.name
        for f in dataclasses.fields(kind)
        if set(typing.get_args(hints[f.name]) or (hints[f.name],)) & {int, float}
    ]
    assert {"steps", "batch_size", "seed", "warmdown_frac"} <= set(numeric) or kind is TelemetryConfig
    for name in numeric:
        with pytest.raises(ValueError, match=rf"{name} must be"):
            kind(**{name: True})
