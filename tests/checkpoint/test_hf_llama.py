"""config.json -> LLMConfig (and what is refused), the fused Q/K/V and gate/up layouts, the per-stage key list."""

import dataclasses

import pytest
import torch

from megatron_visualchat.checkpoint.errors import CheckpointError
from megatron_visualchat.checkpoint.hf_llama import (
    FUSIONS,
    TensorMap,
    hf_tensor_shapes,
    hf_tensors,
    llm_config_from_hf,
    rank_parts,
    stage_state_keys,
)
from megatron_visualchat.checkpoint.sharding import pad_vocab_rows, split_kind, split_tensor
from megatron_visualchat.config import LLM_PRESETS, LLMConfig, ParallelConfig

# The published LLaMA-2-70B config.json (transformers 4 style).
LLAMA2_70B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "hidden_size": 8192,
    "intermediate_size": 28672, "max_position_embeddings": 4096, "num_attention_heads": 64,
    "num_hidden_layers": 80, "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float16", "vocab_size": 32000,
}
# LLaMA-3-8B style, written by transformers 5 (rope_parameters, dtype, explicit head_dim).
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 14336, "max_position_embeddings": 8192, "num_attention_heads": 32, "head_dim": 128,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "attention_bias": False,
    "mlp_bias": False, "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
    "tie_word_embeddings": False, "dtype": "bfloat16", "vocab_size": 128256,
}


def test_llama2_70b_config_matches_the_preset():
    assert llm_config_from_hf(LLAMA2_70B) == LLM_PRESETS["llama2-70b"]


def test_llama3_style_config():
    llm = llm_config_from_hf(LLAMA3_8B)
    assert (llm.num_layers, llm.query_groups, llm.rope_base, llm.vocab_size, llm.ffn_hidden_size) == \
        (32, 8, 500000.0, 128256, 14336)
    assert llm.padded_vocab_size(8) == 128256 + 1024 - 128256 % 1024


def test_mistral_without_sliding_window_and_tied_embeddings():
    cfg = {**LLAMA2_70B, "architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": None,
           "rope_theta": 1e6, "tie_word_embeddings": True}
    llm = llm_config_from_hf(cfg, make_vocab_size_divisible_by=64)
    assert (llm.rope_base, llm.untie_embeddings, llm.make_vocab_size_divisible_by) == (1e6, False, 64)


@pytest.mark.parametrize("change,needle", [
    ({"architectures": ["GPT2LMHeadModel"]}, "architectures"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_type"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"sliding_window": 4096}, "sliding_window"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"head_dim": 256}, "head_dim"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"rope_theta": 10000.5}, "rope_theta"),
    ({"num_key_value_heads": 7}, "num_query_groups=7"),
])
def test_unsupported_configs_are_refused_by_name(change, needle):
    with pytest.raises(ValueError, match=needle):
        llm_config_from_hf({**LLAMA2_70B, **change}, source="x/config.json")


def test_missing_key_is_named():
    cfg = dict(LLAMA2_70B)
    del cfg["intermediate_size"]
    with pytest.raises(CheckpointError, match="x/config.json: missing key 'intermediate_size'"):
        llm_config_from_hf(cfg, source="x/config.json")


GQA = LLMConfig(num_layers=4, hidden_size=64, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=96,
                vocab_size=250, make_vocab_size_divisible_by=8)
MHA = dataclasses.replace(GQA, num_query_groups=None)


def _sources(llm, hf_names, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = hf_tensor_shapes(llm)
    return [torch.randn(shapes[n], generator=g) for n in hf_names]


def _maps(llm, parallel):
    return [m for s in range(parallel.pp) for _, m in stage_state_keys(llm, parallel, s) if m is not None]


@pytest.mark.parametrize("llm", [GQA, MHA], ids=["gqa", "mha"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_rank_parts_equal_split_of_the_fused_tensor(llm, tp):
    """Building a rank's shard from HF rows equals fusing fully, then splitting with sharding.py's rules."""
    for tmap in _maps(llm, ParallelConfig(tp=tp, pp=2)):
        sources = _sources(llm, tmap.hf)
        full = torch.cat(rank_parts(tmap, sources, llm, 1, 0))
        if tmap.pad_vocab:
            assert full.shape[0] == llm.padded_vocab_size(1)
            full = pad_vocab_rows(full, llm.padded_vocab_size(tp))
        for r in range(tp):
            got = torch.cat(rank_parts(tmap, sources, llm, tp, r))
            torch.testing.assert_close(got, split_tensor(full, split_kind(tmap.megatron), tp, r), rtol=0, atol=0)
        assert all(torch.equal(a, b) for a, b in zip(
            hf_tensors(tmap, [torch.cat(rank_parts(tmap, sources, llm, tp, r)) for r in range(tp)], llm).values(),
            sources))


def test_qkv_rows_are_grouped_q_then_k_then_v():
    """linear_qkv rows per query group g: the q heads of g, then k_g, then v_g (megatron-core's layout)."""
    llm, hd = GQA, GQA.head_dim
    q, k, v = _sources(llm, [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"])
    fused = torch.cat(FUSIONS["qkv"].parts([q, k, v], llm))
    per_group = 2 * hd + 2 * hd  # 2 q heads per group, then k and v
    for g in range(4):
        block = fused[g * per_group:(g + 1) * per_group]
        assert torch.equal(block[:2 * hd], q[g * 2 * hd:(g + 1) * 2 * hd])
        assert torch.equal(block[2 * hd:3 * hd], k[g * hd:(g + 1) * hd])
        assert torch.equal(block[3 * hd:], v[g * hd:(g + 1) * hd])


def test_fc1_rank_shard_is_gate_rows_then_up_rows():
    gate, up = _sources(GQA, ["model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"])
    tmap = TensorMap("decoder.layers.0.mlp.linear_fc1.weight", ("g", "u"), "glu")
    shard = torch.cat(rank_parts(tmap, [gate, up], GQA, 2, 1))
    assert torch.equal(shard, torch.cat([gate[48:], up[48:]]))


def test_stage_keys_place_embeddings_and_head():
    par = ParallelConfig(tp=1, pp=2)
    first = dict(stage_state_keys(GQA, par, 0))
    last = dict(stage_state_keys(GQA, par, 1))
    assert "embedding.word_embeddings.weight" in first and "output_layer.weight" not in first
    assert {"decoder.final_layernorm.weight", "output_layer.weight", "output_layer._extra_state"} <= set(last)
    assert first["decoder.layers.1.mlp.linear_fc1.weight"].hf == (
        "model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight")
    assert last["decoder.layers.1.mlp.linear_fc2.weight"].hf == ("model.layers.3.mlp.down_proj.weight",)
    assert last["decoder.layers.0.self_attention.linear_qkv._extra_state"] is None


def test_tied_embeddings_keys():
    """Tied: no output layer weight at PP=1; at PP>1 the last stage keeps a (non-exported) copy of embed_tokens."""
    tied = dataclasses.replace(GQA, untie_embeddings=False)
    single = dict(stage_state_keys(tied, ParallelConfig(), 0))
    assert "output_layer.weight" not in single and "output_layer._extra_state" in single
    head = dict(stage_state_keys(tied, ParallelConfig(pp=2), 1))["output_layer.weight"]
    assert head.hf == ("model.embed_tokens.weight",) and not head.export
    assert "lm_head.weight" not in hf_tensor_shapes(tied)
