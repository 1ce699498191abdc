"""Discovery on tiny random models of every transformers family with an FFN (no downloads).

For each family: discovery finds ``pre`` and ``post`` in every layer of every
stack, at the modules a person would name (``FAMILIES``), and the probe's ranks
equal ranks computed here from this test's own hooks on those modules (float64,
rel 1e-6). ``FAMILIES`` is also the source of the table in docs/models.md
(``test_models_doc_is_in_sync``; regenerate with ``python tests/test_probe_families.py``).
"""

from __future__ import annotations

import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

T = pytest.importorskip("transformers")

from capscale.probe import NoFFNError, attach, discover, discover_sites  # noqa: E402

DOC = Path(__file__).parents[1] / "docs" / "models.md"
LL = dict(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=32,
    pad_token_id=0,
    bos_token_id=0,
    eos_token_id=0,
)
TOK = dict(pad_token_id=0, bos_token_id=0, eos_token_id=0)
SEQ2SEQ = dict(
    vocab_size=64,
    d_model=16,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=40,
    decoder_ffn_dim=40,
    max_position_embeddings=32,
    decoder_start_token_id=0,
    **TOK,
)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=24)


@dataclass
class Family:
    """A tiny model and where a person would hook it: ``{stack: (pre, post)}`` patterns with ``{layer}``.

    ``pre`` is a module's output (``[:k]`` suffix: its first k channels, the gate half
    of a fused gate_up); ``post`` a module's input; ``experts:`` marks fused MoE experts.
    """

    name: str
    config: str
    model: str
    kwargs: dict
    sites: dict[str, tuple[str, str]]
    inputs: str = "ids"  # ids | seq2seq | audio | image | wave
    note: str = ""
    extra: dict = field(default_factory=dict)
    # One module applied at several depths (ALBERT): layer k of a module is its k-th call in a forward.
    shared: bool = False
    # Layers with no FFN (a hybrid's Mamba layers): named in the "not measured" warning.
    no_ffn: tuple[int, ...] = ()


def _llama_like(name, config, model, prefix="model.layers", **kw):
    pre = f"{prefix}.{{layer}}.mlp.gate_proj"
    return Family(name, config, model, dict(LL, **kw), {"": (pre, f"{prefix}.{{layer}}.mlp.down_proj")})


def _mlp(name, config, model, up, down, prefix="model.layers", **kw):
    """A decoder whose FFN is ``{prefix}.{layer}.{up}`` / ``{down}``."""
    kw = dict(LL, head_dim=8, **kw)
    return Family(name, config, model, kw, {"": (f"{prefix}.{{layer}}.{up}", f"{prefix}.{{layer}}.{down}")})


def _moe(name, config, model, shared="", dense=(), note="", **kw):
    """A decoder whose layers hold fused experts (``mlp.experts``), a shared expert, dense layers."""
    kw = dict(LL, head_dim=8, **kw)
    routed = {k: (f"experts:model.layers.{k}.mlp.experts",) * 2 for k in range(2) if k not in dense}
    routed.update({k: (f"model.layers.{k}.mlp.gate_proj", f"model.layers.{k}.mlp.down_proj") for k in dense})
    sites = {"": dict(sorted(routed.items()))}
    if shared:
        sites["shared-expert"] = {
            k: (f"model.layers.{k}.mlp.{shared}.gate_proj", f"model.layers.{k}.mlp.{shared}.down_proj")
            for k in range(2)
            if k not in dense
        }
    return Family(name, config, model, kw, sites, note=note)


FAMILIES = [
    Family(
        "GPT-2",
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2, **TOK),
        {"": ("transformer.h.{layer}.mlp.c_fc", "transformer.h.{layer}.mlp.c_proj")},
        note="HF Conv1D ([in, out] weight)",
    ),
    Family(
        "GPT-Neo",
        "GPTNeoConfig",
        "GPTNeoForCausalLM",
        dict(
            vocab_size=64,
            max_position_embeddings=32,
            hidden_size=16,
            num_layers=2,
            num_heads=2,
            attention_types=[[["global", "local"], 1]],
            intermediate_size=40,
            **TOK,
        ),
        {"": ("transformer.h.{layer}.mlp.c_fc", "transformer.h.{layer}.mlp.c_proj")},
    ),
    Family(
        "GPT-NeoX (Pythia)",
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        dict(LL),
        {"": ("gpt_neox.layers.{layer}.mlp.dense_h_to_4h", "gpt_neox.layers.{layer}.mlp.dense_4h_to_h")},
    ),
    Family(
        "GPT-J",
        "GPTJConfig",
        "GPTJForCausalLM",
        dict(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2, rotary_dim=4, **TOK),
        {"": ("transformer.h.{layer}.mlp.fc_in", "transformer.h.{layer}.mlp.fc_out")},
    ),
    Family(
        "CodeGen",
        "CodeGenConfig",
        "CodeGenForCausalLM",
        dict(vocab_size=64, n_positions=32, n_ctx=32, n_embd=16, n_layer=2, n_head=2, rotary_dim=4, **TOK),
        {"": ("transformer.h.{layer}.mlp.fc_in", "transformer.h.{layer}.mlp.fc_out")},
    ),
    Family(
        "GPTBigCode (StarCoder)",
        "GPTBigCodeConfig",
        "GPTBigCodeForCausalLM",
        dict(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2, **TOK),
        {"": ("transformer.h.{layer}.mlp.c_fc", "transformer.h.{layer}.mlp.c_proj")},
    ),
    Family(
        "OPT",
        "OPTConfig",
        "OPTForCausalLM",
        dict(
            vocab_size=64,
            hidden_size=16,
            ffn_dim=40,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=32,
            word_embed_proj_dim=16,
            **TOK,
        ),
        {"": ("model.decoder.layers.{layer}.fc1", "model.decoder.layers.{layer}.fc2")},
    ),
    Family(
        "BLOOM",
        "BloomConfig",
        "BloomForCausalLM",
        dict(vocab_size=64, hidden_size=16, n_layer=2, n_head=2, **TOK),
        {"": ("transformer.h.{layer}.mlp.dense_h_to_4h", "transformer.h.{layer}.mlp.dense_4h_to_h")},
    ),
    Family(
        "Falcon",
        "FalconConfig",
        "FalconForCausalLM",
        dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, **TOK),
        {"": ("transformer.h.{layer}.mlp.dense_h_to_4h", "transformer.h.{layer}.mlp.dense_4h_to_h")},
    ),
    Family(
        "MPT",
        "MptConfig",
        "MptForCausalLM",
        dict(vocab_size=64, d_model=16, n_heads=2, n_layers=2, max_seq_len=32, **TOK),
        {"": ("transformer.blocks.{layer}.ffn.up_proj", "transformer.blocks.{layer}.ffn.down_proj")},
    ),
    Family(
        "Phi",
        "PhiConfig",
        "PhiForCausalLM",
        dict(LL),
        {"": ("model.layers.{layer}.mlp.fc1", "model.layers.{layer}.mlp.fc2")},
    ),
    Family(
        "Phi-3",
        "Phi3Config",
        "Phi3ForCausalLM",
        dict(LL),
        {"": ("model.layers.{layer}.mlp.gate_up_proj[:40]", "model.layers.{layer}.mlp.down_proj")},
        note="fused gate_up: the gate half",
    ),
    Family(
        "Starcoder2",
        "Starcoder2Config",
        "Starcoder2ForCausalLM",
        dict(LL),
        {"": ("model.layers.{layer}.mlp.c_fc", "model.layers.{layer}.mlp.c_proj")},
    ),
    _llama_like("Llama", "LlamaConfig", "LlamaForCausalLM"),
    _llama_like("Mistral", "MistralConfig", "MistralForCausalLM"),
    _llama_like("Qwen2", "Qwen2Config", "Qwen2ForCausalLM"),
    _llama_like("Qwen3", "Qwen3Config", "Qwen3ForCausalLM", head_dim=8),
    _llama_like("Gemma", "GemmaConfig", "GemmaForCausalLM", head_dim=8),
    _llama_like("Gemma 2", "Gemma2Config", "Gemma2ForCausalLM", head_dim=8),
    _llama_like("OLMo", "OlmoConfig", "OlmoForCausalLM"),
    _llama_like("OLMo 2", "Olmo2Config", "Olmo2ForCausalLM"),
    _llama_like("Granite", "GraniteConfig", "GraniteForCausalLM"),
    _llama_like("Cohere", "CohereConfig", "CohereForCausalLM"),
    _llama_like("StableLM", "StableLmConfig", "StableLmForCausalLM"),
    Family(
        "BERT",
        "BertConfig",
        "BertForMaskedLM",
        dict(LL),
        {"": ("bert.encoder.layer.{layer}.intermediate.dense", "bert.encoder.layer.{layer}.output.dense")},
    ),
    Family(
        "RoBERTa",
        "RobertaConfig",
        "RobertaForMaskedLM",
        dict(LL, max_position_embeddings=40, pad_token_id=1),
        {"": ("roberta.encoder.layer.{layer}.intermediate.dense", "roberta.encoder.layer.{layer}.output.dense")},
    ),
    Family(
        "ELECTRA",
        "ElectraConfig",
        "ElectraModel",
        dict(LL, embedding_size=16),
        {"": ("encoder.layer.{layer}.intermediate.dense", "encoder.layer.{layer}.output.dense")},
    ),
    Family(
        "DistilBERT",
        "DistilBertConfig",
        "DistilBertForMaskedLM",
        dict(vocab_size=64, dim=16, hidden_dim=40, n_layers=2, n_heads=2, max_position_embeddings=32, pad_token_id=0),
        {"": ("distilbert.transformer.layer.{layer}.ffn.lin1", "distilbert.transformer.layer.{layer}.ffn.lin2")},
    ),
    Family(
        "T5",
        "T5Config",
        "T5ForConditionalGeneration",
        dict(vocab_size=64, d_model=16, d_kv=8, d_ff=40, num_layers=2, num_heads=2, decoder_start_token_id=0),
        {
            "encoder": (
                "encoder.block.{layer}.layer.1.DenseReluDense.wi",
                "encoder.block.{layer}.layer.1.DenseReluDense.wo",
            ),
            "decoder": (
                "decoder.block.{layer}.layer.2.DenseReluDense.wi",
                "decoder.block.{layer}.layer.2.DenseReluDense.wo",
            ),
        },
        inputs="seq2seq",
    ),
    Family(
        "T5 v1.1 / Flan-T5 (gated)",
        "T5Config",
        "T5ForConditionalGeneration",
        dict(
            vocab_size=64,
            d_model=16,
            d_kv=8,
            d_ff=40,
            num_layers=2,
            num_heads=2,
            feed_forward_proj="gated-gelu",
            decoder_start_token_id=0,
        ),
        {
            "encoder": (
                "encoder.block.{layer}.layer.1.DenseReluDense.wi_0",
                "encoder.block.{layer}.layer.1.DenseReluDense.wo",
            ),
            "decoder": (
                "decoder.block.{layer}.layer.2.DenseReluDense.wi_0",
                "decoder.block.{layer}.layer.2.DenseReluDense.wo",
            ),
        },
        inputs="seq2seq",
    ),
    Family(
        "BART",
        "BartConfig",
        "BartForConditionalGeneration",
        dict(SEQ2SEQ),
        {
            "encoder": ("model.encoder.layers.{layer}.fc1", "model.encoder.layers.{layer}.fc2"),
            "decoder": ("model.decoder.layers.{layer}.fc1", "model.decoder.layers.{layer}.fc2"),
        },
        inputs="seq2seq",
    ),
    Family(
        "Pegasus",
        "PegasusConfig",
        "PegasusForConditionalGeneration",
        dict(SEQ2SEQ),
        {
            "encoder": ("model.encoder.layers.{layer}.fc1", "model.encoder.layers.{layer}.fc2"),
            "decoder": ("model.decoder.layers.{layer}.fc1", "model.decoder.layers.{layer}.fc2"),
        },
        inputs="seq2seq",
    ),
    Family(
        "Whisper",
        "WhisperConfig",
        "WhisperForConditionalGeneration",
        dict(
            {k: v for k, v in SEQ2SEQ.items() if k != "max_position_embeddings"},
            num_mel_bins=8,
            max_source_positions=16,
            max_target_positions=32,
        ),
        {
            "encoder": ("model.encoder.layers.{layer}.fc1", "model.encoder.layers.{layer}.fc2"),
            "decoder": ("model.decoder.layers.{layer}.fc1", "model.decoder.layers.{layer}.fc2"),
        },
        inputs="audio",
    ),
    Family(
        "Mixtral",
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(LL, num_local_experts=4, num_experts_per_tok=2),
        {"": ("experts:model.layers.{layer}.mlp.experts", "experts:model.layers.{layer}.mlp.experts")},
        note="fused 3-D experts: pooled over the tokens each expert saw",
    ),
    Family(
        "Qwen2-MoE (mlp_only_layers=[0])",
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(LL, num_experts=4, shared_expert_intermediate_size=32, mlp_only_layers=[0], **MOE),
        {
            "": {
                0: ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.down_proj"),
                1: ("experts:model.layers.1.mlp.experts", "experts:model.layers.1.mlp.experts"),
            },
            "shared-expert": {
                1: ("model.layers.1.mlp.shared_expert.gate_proj", "model.layers.1.mlp.shared_expert.down_proj")
            },
        },
        note="dense layer 0, MoE layer 1, shared expert",
    ),
    Family(
        "DeepSeek-V3 (first_k_dense_replace=1)",
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            LL,
            n_routed_experts=4,
            n_shared_experts=1,
            first_k_dense_replace=1,
            kv_lora_rank=8,
            q_lora_rank=8,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=8,
            n_group=1,
            topk_group=1,
            num_experts_per_tok=2,
            moe_intermediate_size=12,  # I < H, as DeepSeek-V3's own 2048 < 7168
        ),
        {
            "": {
                0: ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.down_proj"),
                1: ("experts:model.layers.1.mlp.experts", "experts:model.layers.1.mlp.experts"),
            },
            "shared-expert": {
                1: ("model.layers.1.mlp.shared_experts.gate_proj", "model.layers.1.mlp.shared_experts.down_proj")
            },
        },
        note="dense layer 0, MoE layer 1, shared experts",
    ),
    Family(
        "Qwen3-MoE",
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(LL, num_experts=4, head_dim=8, **MOE),
        {"": ("experts:model.layers.{layer}.mlp.experts", "experts:model.layers.{layer}.mlp.experts")},
    ),
    Family(
        "OLMoE",
        "OlmoeConfig",
        "OlmoeForCausalLM",
        dict(LL, num_experts=4, num_experts_per_tok=2),
        {"": ("experts:model.layers.{layer}.mlp.experts", "experts:model.layers.{layer}.mlp.experts")},
    ),
    Family(
        "Switch Transformers",
        "SwitchTransformersConfig",
        "SwitchTransformersForConditionalGeneration",
        dict(
            vocab_size=64,
            d_model=16,
            d_kv=8,
            d_ff=40,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=2,
            num_experts=4,
            encoder_sparse_step=2,
            decoder_sparse_step=2,
            decoder_start_token_id=0,
            **TOK,
        ),
        {
            "encoder": {
                0: ("encoder.block.0.layer.1.mlp.wi", "encoder.block.0.layer.1.mlp.wo"),
                1: ("pooled:encoder.block.1.layer.1.mlp.experts", "pooled:encoder.block.1.layer.1.mlp.experts"),
            },
            "decoder": {
                0: ("decoder.block.0.layer.2.mlp.wi", "decoder.block.0.layer.2.mlp.wo"),
                1: ("pooled:decoder.block.1.layer.2.mlp.experts", "pooled:decoder.block.1.layer.2.mlp.experts"),
            },
        },
        inputs="seq2seq",
        note="expert modules: pooled over the tokens each expert saw",
        extra={"expert_ffn": ("wi", "wo")},
    ),
    Family(
        "ALBERT (one layer shared by 3 depths)",
        "AlbertConfig",
        "AlbertModel",
        dict(
            vocab_size=64,
            embedding_size=8,
            hidden_size=16,
            intermediate_size=40,
            num_hidden_layers=3,
            num_attention_heads=2,
            max_position_embeddings=32,
        ),
        {
            "": {
                k: (
                    "encoder.albert_layer_groups.0.albert_layers.0.ffn",
                    "encoder.albert_layer_groups.0.albert_layers.0.ffn_output",
                )
                for k in range(3)
            }
        },
        note="one row per application, its depth as the layer",
        shared=True,
    ),
    Family(
        "ALBERT (2 groups of 2 inner layers, 4 depths)",
        "AlbertConfig",
        "AlbertModel",
        dict(
            vocab_size=64,
            embedding_size=8,
            hidden_size=16,
            intermediate_size=40,
            num_hidden_layers=2,
            num_hidden_groups=2,
            inner_group_num=2,
            num_attention_heads=2,
            max_position_embeddings=32,
        ),
        {
            "": {
                2 * g + j: (
                    f"encoder.albert_layer_groups.{g}.albert_layers.{j}.ffn",
                    f"encoder.albert_layer_groups.{g}.albert_layers.{j}.ffn_output",
                )
                for g in range(2)
                for j in range(2)
            }
        },
        note="nested: groups of layers",
    ),
    Family(
        "Funnel (block_sizes=[2, 2])",
        "FunnelConfig",
        "FunnelModel",
        dict(vocab_size=64, block_sizes=[2, 2], d_model=16, n_head=2, d_head=8, d_inner=40, num_decoder_layers=2),
        {
            "encoder": {
                2 * b + j: (
                    f"encoder.blocks.{b}.{j}.ffn.linear_1",
                    f"encoder.blocks.{b}.{j}.ffn.linear_2",
                )
                for b in range(2)
                for j in range(2)
            },
            "decoder": ("decoder.layers.{layer}.ffn.linear_1", "decoder.layers.{layer}.ffn.linear_2"),
        },
        note="nested stacks: encoder blocks of layers, depth counted through the blocks",
    ),
    Family(
        "MobileBERT (num_feedforward_networks=2)",
        "MobileBertConfig",
        "MobileBertModel",
        dict(
            vocab_size=64,
            hidden_size=16,
            embedding_size=8,
            intermediate_size=40,
            intra_bottleneck_size=8,
            true_hidden_size=8,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_feedforward_networks=2,
            max_position_embeddings=32,
        ),
        {
            "": ("encoder.layer.{layer}.intermediate.dense", "encoder.layer.{layer}.output.dense"),
            "ffn.0": (
                "encoder.layer.{layer}.ffn.0.intermediate.dense",
                "encoder.layer.{layer}.ffn.0.output.dense",
            ),
        },
        note="several FFNs per block: the extra ones are stacks `ffn.0`, `ffn.1`, …",
    ),
    Family(
        "SqueezeBERT",
        "SqueezeBertConfig",
        "SqueezeBertModel",
        dict(
            vocab_size=64,
            hidden_size=16,
            embedding_size=16,
            intermediate_size=40,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=32,
        ),
        {"": ("encoder.layers.{layer}.intermediate.conv1d", "encoder.layers.{layer}.output.conv1d")},
        note="Conv1d kernel 1, channels-first `[B, C, T]`: measured over channels",
    ),
    Family(
        "Swin",
        "SwinConfig",
        "SwinModel",
        dict(image_size=16, patch_size=4, num_channels=3, embed_dim=8, depths=[2, 2], num_heads=[2, 2], window_size=2),
        {
            "": {
                2 * st + b: (
                    f"encoder.layers.{st}.blocks.{b}.mlp.fc1",
                    f"encoder.layers.{st}.blocks.{b}.mlp.fc2",
                )
                for st in range(2)
                for b in range(2)
            }
        },
        inputs="image",
        note="blocks inside stages: depth counted through the stages",
    ),
    Family(
        "NLLB-MoE",
        "NllbMoeConfig",
        "NllbMoeForConditionalGeneration",
        dict(SEQ2SEQ, num_experts=4, encoder_sparse_step=2, decoder_sparse_step=2),
        {
            "encoder": {
                0: ("model.encoder.layers.0.ffn.fc1", "model.encoder.layers.0.ffn.fc2"),
                1: ("pooled:model.encoder.layers.1.ffn.experts", "pooled:model.encoder.layers.1.ffn.experts"),
            },
            "decoder": {
                0: ("model.decoder.layers.0.ffn.fc1", "model.decoder.layers.0.ffn.fc2"),
                1: ("pooled:model.decoder.layers.1.ffn.experts", "pooled:model.decoder.layers.1.ffn.experts"),
            },
        },
        inputs="seq2seq",
        note="experts dict also holds a Dropout: the experts are the modules with weights",
        extra={"expert_ffn": ("fc1", "fc2")},
    ),
    Family(
        "Llama4 (fused experts [E, H, 2I])",
        "Llama4TextConfig",
        "Llama4ForCausalLM",
        dict(
            LL,
            intermediate_size_mlp=48,
            num_local_experts=4,
            num_experts_per_tok=1,
            head_dim=8,
            interleave_moe_layer_step=1,
        ),
        {
            "": (
                "llama4:model.layers.{layer}.feed_forward.experts",
                "llama4:model.layers.{layer}.feed_forward.experts",
            ),
            "shared-expert": (
                "model.layers.{layer}.feed_forward.shared_expert.gate_proj",
                "model.layers.{layer}.feed_forward.shared_expert.down_proj",
            ),
        },
        note="every expert reads every token scaled by its router score: the routed (non-zero) rows",
    ),
    Family(
        "DBRX",
        "DbrxConfig",
        "DbrxForCausalLM",
        dict(
            d_model=16,
            n_heads=2,
            n_layers=2,
            max_seq_len=32,
            vocab_size=64,
            attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
            ffn_config=dict(ffn_hidden_size=40, moe_num_experts=4, moe_top_k=2),
            **TOK,
        ),
        {"": ("dbrx:transformer.blocks.{layer}.ffn.experts", "dbrx:transformer.blocks.{layer}.ffn.experts")},
        note="fused `mlp.{w1, v1, w2}` `[E·I, H]`: w1 the gate",
    ),
    Family(
        "Zamba (hybrid: Mamba layers + shared attention/MLP blocks)",
        "ZambaConfig",
        "ZambaForCausalLM",
        dict(
            LL,
            num_hidden_layers=6,
            attn_layer_period=3,
            attn_layer_offset=1,
            mamba_d_state=4,
            mamba_expand=2,
            mamba_dt_rank=4,
            attention_head_dim=8,
            n_mamba_heads=1,
        ),
        {
            "": {
                k: (
                    f"model.layers.{k}.shared_transf.feed_forward.gate_proj",
                    f"model.layers.{k}.shared_transf.feed_forward.down_proj",
                )
                for k in (2, 4)
            }
        },
        note="attention reads [h, h0] (2H): the FFN is found on H; Mamba layers named as without FFN",
        no_ffn=(0, 1, 3, 5),
    ),
    Family(
        "ConvNeXt",
        "ConvNextConfig",
        "ConvNextModel",
        dict(num_channels=3, patch_size=4, num_stages=2, hidden_sizes=[8, 16], depths=[1, 2]),
        {
            "": {
                0: ("encoder.stages.0.layers.0.pwconv1", "encoder.stages.0.layers.0.pwconv2"),
                1: ("encoder.stages.1.layers.0.pwconv1", "encoder.stages.1.layers.0.pwconv2"),
                2: ("encoder.stages.1.layers.1.pwconv1", "encoder.stages.1.layers.1.pwconv2"),
            }
        },
        inputs="image",
        note="blocks in stages, channels-last `[B, H, W, C]`: rows are pixels",
    ),
    Family(
        "Wav2Vec2-Conformer (two half-step FFNs per block)",
        "Wav2Vec2ConformerConfig",
        "Wav2Vec2ConformerModel",
        dict(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=40,
            conv_dim=(8, 8),
            conv_stride=(5, 2),
            conv_kernel=(10, 3),
            num_conv_pos_embeddings=4,
            num_conv_pos_embedding_groups=2,
            conv_depthwise_kernel_size=3,
            vocab_size=32,
        ),
        {
            stack: (
                f"encoder.layers.{{layer}}.{stack}.intermediate_dense",
                f"encoder.layers.{{layer}}.{stack}.output_dense",
            )
            for stack in ("ffn1", "ffn2")
        },
        inputs="wave",
        note="FFNs side by side in a block: each is a stack named by its path",
    ),
    Family(
        "I-BERT",
        "IBertConfig",
        "IBertModel",
        dict(LL, max_position_embeddings=40, pad_token_id=1),
        {"": ("encoder.layer.{layer}.intermediate.dense", "encoder.layer.{layer}.output.dense")},
        note="`QuantLinear`: a linear of its own class (in/out features, `[out, in]` weight)",
    ),
    _llama_like("Helium", "HeliumConfig", "HeliumForCausalLM", head_dim=8),
    _llama_like("EXAONE 4", "Exaone4Config", "Exaone4ForCausalLM", head_dim=8),
    _llama_like("SmolLM3", "SmolLM3Config", "SmolLM3ForCausalLM", head_dim=8),
    _llama_like("OLMo 3", "Olmo3Config", "Olmo3ForCausalLM", head_dim=8),
    _llama_like("Seed-OSS", "SeedOssConfig", "SeedOssForCausalLM", head_dim=8),
    _llama_like("Ministral", "MinistralConfig", "MinistralForCausalLM", head_dim=8),
    _llama_like("Cohere 2", "Cohere2Config", "Cohere2ForCausalLM", head_dim=8),
    _llama_like("BitNet", "BitNetConfig", "BitNetForCausalLM", head_dim=8),
    _llama_like("HunYuan dense", "HunYuanDenseV1Config", "HunYuanDenseV1ForCausalLM", head_dim=8),
    _llama_like("ERNIE 4.5", "Ernie4_5Config", "Ernie4_5ForCausalLM", head_dim=8),
    _llama_like("CWM", "CwmConfig", "CwmForCausalLM", head_dim=8),
    _mlp("Arcee (ReLU² MLP)", "ArceeConfig", "ArceeForCausalLM", "mlp.up_proj", "mlp.down_proj"),
    _mlp("Nemotron", "NemotronConfig", "NemotronForCausalLM", "mlp.up_proj", "mlp.down_proj"),
    _mlp("Apertus", "ApertusConfig", "ApertusForCausalLM", "mlp.up_proj", "mlp.down_proj"),
    _mlp("Persimmon", "PersimmonConfig", "PersimmonForCausalLM", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    _mlp("GLM", "GlmConfig", "GlmForCausalLM", "mlp.gate_up_proj[:40]", "mlp.down_proj"),
    _mlp("GLM-4", "Glm4Config", "Glm4ForCausalLM", "mlp.gate_up_proj[:40]", "mlp.down_proj"),
    _moe("Phi-MoE", "PhimoeConfig", "PhimoeForCausalLM", **dict(num_local_experts=4, num_experts_per_tok=2)),
    _moe("MiniMax", "MiniMaxConfig", "MiniMaxForCausalLM", **dict(num_local_experts=4, num_experts_per_tok=2)),
    _moe("FlexOlmo", "FlexOlmoConfig", "FlexOlmoForCausalLM", num_experts=4, num_experts_per_tok=2),
    _moe(
        "HunYuan MoE",
        "HunYuanMoEV1Config",
        "HunYuanMoEV1ForCausalLM",
        shared="shared_mlp",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
    ),
    _moe(
        "GLM-4 MoE",
        "Glm4MoeConfig",
        "Glm4MoeForCausalLM",
        shared="shared_experts",
        n_routed_experts=4,
        first_k_dense_replace=0,
        **MOE,
    ),
    _moe(
        "DeepSeek-V2",
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        shared="shared_experts",
        n_routed_experts=4,
        first_k_dense_replace=0,
        kv_lora_rank=8,
        q_lora_rank=8,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=8,
        **MOE,
    ),
    _moe("AFMoE", "AfmoeConfig", "AfmoeForCausalLM", shared="shared_experts", num_experts=4, num_dense_layers=0, **MOE),
    _moe(
        "ERNIE 4.5 MoE",
        "Ernie4_5_MoeConfig",
        "Ernie4_5_MoeForCausalLM",
        shared="shared_experts",
        dense=(0,),
        moe_num_experts=4,
        moe_k=2,
        moe_intermediate_size=24,
        note="dense layer 0",
    ),
    Family(
        "Granite MoE",
        "GraniteMoeConfig",
        "GraniteMoeForCausalLM",
        dict(LL, num_local_experts=4, num_experts_per_tok=2),
        {"": ("experts:model.layers.{layer}.block_sparse_moe.experts",) * 2},
    ),
    Family(
        "ViT",
        "ViTConfig",
        "ViTModel",
        dict(
            image_size=16,
            patch_size=4,
            num_channels=3,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=40,
        ),
        {"": ("layers.{layer}.mlp.fc1", "layers.{layer}.mlp.fc2")},
        inputs="image",
    ),
    Family(
        "DINOv2",
        "Dinov2Config",
        "Dinov2Model",
        dict(
            image_size=16,
            patch_size=4,
            num_channels=3,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=40,
            mlp_ratio=3,
        ),
        {"": ("encoder.layer.{layer}.mlp.fc1", "encoder.layer.{layer}.mlp.fc2")},
        inputs="image",
    ),
]


def _pair(fam: Family, stack: str, layer: int) -> tuple[str, str]:
    """The (pre, post) a person names for one layer: a {layer} pattern, or per layer (mixed dense/MoE)."""
    value = fam.sites[stack]
    if isinstance(value, dict):
        return value[layer]
    return value[0].format(layer=layer), value[1].format(layer=layer)


def _layers(fam: Family, stack: str) -> list[int]:
    value = fam.sites[stack]
    return sorted(value) if isinstance(value, dict) else [0, 1]


def build(fam: Family):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(T, fam.model)(getattr(T, fam.config)(**fam.kwargs))
    return model.eval()


def inputs(fam: Family) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 64, (4, 12), generator=g)
    if fam.inputs == "seq2seq":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(1, 64, (4, 10), generator=g)}
    if fam.inputs == "wave":
        return {"input_values": torch.randn(2, 400, generator=g)}
    if fam.inputs == "image":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
    if fam.inputs == "audio":
        return {
            "input_features": torch.randn(4, 8, 32, generator=g),
            "decoder_input_ids": torch.randint(1, 64, (4, 10), generator=g),
        }
    return {"input_ids": ids}


def _strip(name: str) -> tuple[str, int | None, str]:
    experts = next((k for k in ("experts", "pooled", "llama4", "dbrx") if name.startswith(k + ":")), "")
    name = name.removeprefix(experts + ":") if experts else name
    m = re.fullmatch(r"(.*)\[:(\d+)\]", name)
    return (m.group(1), int(m.group(2)), experts) if m else (name, None, experts)


def _own_rows(model, fam: Family) -> dict[tuple[str, int, str], np.ndarray]:
    """This test's own capture of every site, float64: hooks on the named modules."""
    got: dict[tuple[str, int, str], list] = {}
    handles = []

    def keep(key, x, mod=None):
        if isinstance(x, tuple):  # I-BERT's QuantLinear returns (output, scaling factor)
            x = x[0]
        if isinstance(mod, torch.nn.Conv1d):  # [B, C, T]: the features are the channels
            x = x.transpose(1, 2)
        got.setdefault(key, []).append(x.detach().double().reshape(-1, x.shape[-1]))

    calls: dict[tuple, int] = {}  # shared modules: calls each hook has seen

    def nth(key, path, layer, x, mod):
        users = [k for k in _layers(fam, key[0]) if _strip(_pair(fam, key[0], k)[key[2] == "post"])[0] == path]
        c = calls.get(key, 0)
        calls[key] = c + 1
        if users[c % len(users)] == layer:
            keep(key, x, mod)

    for stack in fam.sites:
        for layer in _layers(fam, stack):
            for site, name in zip(("pre", "post"), _pair(fam, stack, layer)):
                path, k, experts = _strip(name)
                mod = model.get_submodule(path)
                key = (stack, layer, site)
                if experts == "pooled":  # expert modules: each expert's own up (output) / down (input)
                    up, down = fam.extra["expert_ffn"]
                    for expert in mod.values() if isinstance(mod, torch.nn.ModuleDict) else mod:
                        if not any(True for _ in expert.parameters()):
                            continue  # NLLB-MoE's experts dict also holds its Dropout
                        if site == "pre":
                            h = expert.get_submodule(up).register_forward_hook(lambda m, a, o, key=key: keep(key, o))
                        else:
                            h = expert.get_submodule(down).register_forward_pre_hook(
                                lambda m, a, key=key: keep(key, a[0])
                            )
                        handles.append(h)
                elif experts == "llama4":  # [E * T, H] expert-major, zero rows = not routed

                    def every(m, args, key=key, site=site):
                        x = args[0].view(m.gate_up_proj.shape[0], -1, args[0].shape[-1])
                        for e in range(x.shape[0]):
                            r = x[e][(x[e] != 0).any(dim=1)]
                            gate, up = (r @ m.gate_up_proj[e]).chunk(2, dim=-1)
                            keep(key, gate if site == "pre" else m.act_fn(gate) * up)

                    handles.append(mod.register_forward_pre_hook(every))
                elif experts == "dbrx":  # mlp.w1 / v1: [E * I, H]

                    def dbrx(m, args, key=key, site=site):
                        x, idx = args[0].reshape(-1, args[0].shape[-1]), args[1]
                        for e in range(m.num_experts):
                            tok = (idx == e).any(dim=1)
                            w1 = m.mlp.w1.view(m.num_experts, -1, x.shape[-1])[e]
                            v1 = m.mlp.v1.view(m.num_experts, -1, x.shape[-1])[e]
                            if tok.any():
                                gate, up = x[tok] @ w1.T, x[tok] @ v1.T
                                keep(key, gate if site == "pre" else m.mlp.activation_fn(gate) * up)

                    handles.append(mod.register_forward_pre_hook(dbrx))
                elif experts:

                    def routed(m, args, key=key, site=site):
                        x, idx = args[0], args[1]
                        for e in range(m.gate_up_proj.shape[0]):
                            tok = (idx == e).any(dim=1)
                            if tok.any():
                                gate, up = torch.nn.functional.linear(x[tok], m.gate_up_proj[e]).chunk(2, dim=-1)
                                keep(key, gate if site == "pre" else m.act_fn(gate) * up)

                    handles.append(mod.register_forward_pre_hook(routed))
                elif fam.shared and site == "pre":
                    handles.append(
                        mod.register_forward_hook(lambda m, a, o, key=key, p=path, lay=layer: nth(key, p, lay, o, m))
                    )
                elif fam.shared:
                    handles.append(
                        mod.register_forward_pre_hook(
                            lambda m, a, key=key, p=path, lay=layer: nth(key, p, lay, a[0], m)
                        )
                    )
                elif site == "pre":
                    handles.append(
                        mod.register_forward_hook(
                            lambda m, a, o, key=key, k=k: keep(key, o if k is None else o[..., :k], m)
                        )
                    )
                else:
                    handles.append(mod.register_forward_pre_hook(lambda m, a, key=key: keep(key, a[0], m)))
    with torch.no_grad():
        model(**inputs(fam))
    for h in handles:
        h.remove()
    return {k: torch.cat(v).numpy() for k, v in got.items()}


def _ranks(x: np.ndarray) -> tuple[float, float]:
    lam = np.linalg.eigvalsh(np.cov(x.T))
    # docs/conventions.md: round-off clamped at 1e-12, or at 1e-6 of λ_max for a tiny spectrum
    # (a random tiny OLMo 2 has post-activation λ_max ~1e-10)
    lam = np.clip(lam, min(1e-12, 1e-6 * lam.max()), None)[::-1]
    p = lam / lam.sum()
    return float(np.exp(-(p * np.log(p)).sum())), float(lam.sum() ** 2 / (lam**2).sum())


@pytest.mark.parametrize("fam", FAMILIES, ids=[f.name for f in FAMILIES])
def test_family_sites_and_ranks(fam, one_thread):
    if not hasattr(T, fam.model):
        pytest.skip(f"transformers {T.__version__} has no {fam.model}")
    model = build(fam)
    sites = discover_sites(model)
    expected = {
        (stack, layer, site, _strip(name)[0])
        for stack in fam.sites
        for layer in _layers(fam, stack)
        for site, name in zip(("pre", "post"), _pair(fam, stack, layer))
    }
    assert {(s.stack, s.layer, s.site, s.name) for s in sites} == expected
    if fam.no_ffn:  # named, with the true reason, in the one warning
        skipped = discover(model).skipped
        assert {sk.layer for sk in skipped} == set(fam.no_ffn)
        assert all(sk.reason.startswith("no expanding projection") for sk in skipped)
        with pytest.warns(UserWarning, match="not measured"):
            probe = attach(model, every=1, dtype=torch.float64, mode="any")
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing skipped: no "not measured" warning
            probe = attach(model, every=1, dtype=torch.float64, mode="any")
    with torch.no_grad():
        model(**inputs(fam))
    df = probe.compute()
    probe.close()
    own = _own_rows(model, fam)
    assert set(own) == {(s.stack, s.layer, s.site) for s in sites}
    for (stack, layer, site), x in own.items():
        row = df[(df["stack"] == stack) & (df.layer == layer) & (df.site == site) & (df.bucket == "all")]
        assert len(row) == 1, (stack, layer, site)
        row = row.iloc[0]
        assert row.n_samples == len(x) and row.dim == x.shape[1]
        soft, hard = _ranks(x)
        np.testing.assert_allclose([row.soft_rank, row.hard_rank], [soft, hard], rtol=1e-6)


def test_jetmoe_refused_with_candidates_and_shapes():
    """JetMoE's MLP and attention experts are grouped 3-D weights fed tokens sorted by expert: refused, and why."""
    model = T.JetMoeForCausalLM(T.JetMoeConfig(**LL))
    with pytest.raises(NoFFNError) as e:
        discover_sites(model)
    text = str(e.value)
    assert "FFN candidates were found but none could be measured" in text and "has no FFN" not in text
    assert "model.layers.1.mlp.input_linear" in text and "weight [8, 80, 16]" in text
    assert "model.layers.1.mlp.output_linear" in text and "weight [8, 16, 40]" in text
    assert "unknown layout" in text and "known: gate_up_proj [E, 2I, H]" in text


def test_segformer_mix_ffn_refused_with_the_convolution_named():
    """SegFormer's Mix-FFN runs a depthwise convolution between fc1 and the activation: refused, naming it."""
    config = T.SegformerConfig(
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[8, 16],
        patch_sizes=[3, 3],
        strides=[2, 2],
        num_attention_heads=[1, 2],
        mlp_ratios=[2, 2],
        decoder_hidden_size=16,
    )
    with pytest.raises(NoFFNError) as e:
        discover_sites(T.SegformerModel(config))
    text = str(e.value)
    assert "FFN candidates were found" in text and "has no FFN" not in text
    assert "layer 1 (stages.1.blocks.0): convolutional FFN" in text  # stages opened, depth counted through
    assert "mlp.dwconv.dwconv" in text and "mlp.fc1 (16->32)" in text and "post = the input of mlp.fc2" in text


def test_mamba_has_no_ffn():
    model = T.MambaForCausalLM(T.MambaConfig(vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=2))
    with pytest.raises(NoFFNError, match=r"MambaForCausalLM has no FFN.*backbone\.layers"):
        discover_sites(model)


# -- docs/models.md ---------------------------------------------------------------

BEGIN, END = "<!-- families:begin -->", "<!-- families:end -->"
# Measured exactly by tests of their own.
ELSEWHERE = [
    (
        "torchtitan Llama3 (`debugmodel`, flex attention)",
        "`layers.{layer}.feed_forward.w1`",
        "`layers.{layer}.feed_forward.w2`",
        "✅ tested (`tests/test_probe_torchtitan.py`); blocks in an `nn.ModuleDict`, the key is the layer",
    ),
    (
        "torchtitan DeepSeek-V3 (`debugmodel`, first 2 layers; Qwen3 by its sites)",
        "layer 0: `layers.0.feed_forward.w1`<br>layer 1: `layers.1.moe.routed_experts` (routed experts, "
        "recomputed with GroupedExperts' own grouped GEMM, pooled)<br>shared-expert: layer 1: "
        "`layers.1.moe.shared_experts.w1`",
        "layer 0: `layers.0.feed_forward.w2`<br>layer 1: `layers.1.moe.routed_experts` (routed experts, "
        "pooled)<br>shared-expert: layer 1: `layers.1.moe.shared_experts.w2`",
        "✅ tested (`tests/test_probe_torchtitan.py`), per bucket; experts split over ranks (an `ep` / `etp` "
        "mesh dimension) are listed as not measured, with the reason",
    ),
]
UNREACHABLE = [
    (
        "SegFormer, PVTv2 (Mix-FFN: a depthwise convolution between the up projection and the activation)",
        "—",
        "—",
        "`NoFFNError`: FFN candidates found but none measurable: the convolution named, and the sites to name "
        "(pre = the convolution module's output, post = `fc2`'s input) (tested)",
    ),
    (
        "JetMoE (grouped 3-D experts fed tokens sorted by expert, in its MLP and its attention)",
        "—",
        "—",
        "`NoFFNError`: FFN candidates found but none measurable: each expert weight named with its shape "
        "and the known layouts (tested)",
    ),
    (
        "Mamba, Mamba-2 (state-space mixers, no FFN)",
        "—",
        "—",
        "`NoFFNError`: nothing to measure (tested)",
    ),
]


def _cell(stack: str, name: str, at: str = "") -> str:
    path, k, experts = _strip(name)
    path = re.sub(r"^(model|transformer|bert|roberta|distilbert|gpt_neox)\.", "", path)
    how = {
        "experts": " (fused experts, pooled)",
        "pooled": " (expert modules, pooled)",
        "llama4": " (fused experts `[E, H, 2I]`, routed rows, pooled)",
        "dbrx": " (fused experts, pooled)",
    }.get(experts, "")
    text = at + f"`{path}`" + (" gate half `[:I]`" if k else "") + how
    return f"{stack}: {text}" if stack else text


def table() -> str:
    lines = ["| family | pre (output of) | post (input of) | verified |", "| --- | --- | --- | --- |"]
    for f in FAMILIES:
        pres, posts = [], []
        for stack in f.sites:
            if not isinstance(f.sites[stack], dict):
                pres.append(_cell(stack, f.sites[stack][0]))
                posts.append(_cell(stack, f.sites[stack][1]))
                continue
            by_pair: dict[tuple[str, str], list[int]] = {}
            for layer in _layers(f, stack):
                by_pair.setdefault(_pair(f, stack, layer), []).append(layer)
            for (pre, post), layers in by_pair.items():
                at = f"layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))}: "
                pres.append(_cell(stack, pre, at))
                posts.append(_cell(stack, post, at))
        note = f"; {f.note}" if f.note else ""
        lines.append(f"| {f.name} | {'<br>'.join(pres)} | {'<br>'.join(posts)} | ✅ tested{note} |")
    for name, pre, post, why in ELSEWHERE + UNREACHABLE:
        lines.append(f"| {name} | {pre} | {post} | {why} |")
    return "\n".join(lines)


def test_models_doc_is_in_sync():
    text = DOC.read_text()
    assert BEGIN in text and END in text, f"{DOC} lacks the {BEGIN} … {END} block"
    block = text.split(BEGIN)[1].split(END)[0].strip()
    assert block == table(), f"{DOC} is out of date: run `python tests/test_probe_families.py`"


if __name__ == "__main__":  # rewrite the table in docs/models.md
    text = DOC.read_text()
    head, rest = text.split(BEGIN)
    DOC.write_text(head + BEGIN + "\n" + table() + "\n" + END + rest.split(END)[1])
    sys.exit(0)
