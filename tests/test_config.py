import pytest
import torch

from megatron_visualchat.config import (
    DTYPES, LLM_PRESETS, AttentionConfig, ConfigError, ParallelConfig, TrainableConfig, VisualChatConfig,
    check_choice, dtype_from_flags, dtype_name, pipeline_layout, to_transformer_config,
)


def test_llama2_presets_have_the_published_dimensions():
    p7, p13, p70 = LLM_PRESETS["llama2-7b"], LLM_PRESETS["llama2-13b"], LLM_PRESETS["llama2-70b"]
    assert (p7.num_layers, p7.hidden_size, p7.num_attention_heads, p7.ffn_hidden_size) == (32, 4096, 32, 11008)
    assert (p13.num_layers, p13.hidden_size, p13.num_attention_heads, p13.ffn_hidden_size) == (40, 5120, 40, 13824)
    assert (p70.num_layers, p70.hidden_size, p70.num_attention_heads, p70.query_groups, p70.ffn_hidden_size) == (
        80, 8192, 64, 8, 28672)
    for p in (p7, p13, p70):
        assert (p.vocab_size, p.rms_norm_eps, p.rope_base, p.max_position_embeddings) == (32000, 1e-5, 10000.0, 4096)
        assert p.untie_embeddings and p.head_dim == 128


def test_padded_vocab_is_a_multiple_of_128_times_tp():
    p7 = LLM_PRESETS["llama2-7b"]
    assert p7.padded_vocab_size(1) == 32000
    assert p7.padded_vocab_size(8) == 32768
    assert p7.padded_vocab_size(3) == 32256


@pytest.mark.parametrize("parallel,world,message", [
    (ParallelConfig(tp=3), 3, "tensor parallel size 3 does not divide num_attention_heads=32"),
    (ParallelConfig(pp=3), 3, "pipeline size pp=3 does not divide num_layers=32"),
    (ParallelConfig(pp=2, vpp=3), 2, "pipeline size pp=2 x vpp=3 does not divide num_layers=32"),
    (ParallelConfig(pp=2, pp_layers=(10, 20)), 2, "sums to 30, but the model has num_layers=32"),
    (ParallelConfig(pp=2, pp_layers=(32,)), 2, "expected one per pipeline stage (pp=2)"),
    (ParallelConfig(tp=2, pp=2), 8, "world size 8 != tp(2) x pp(2) x dp(1) = 4"),
])
def test_parallel_validation_names_the_numbers(parallel, world, message):
    with pytest.raises(ConfigError) as err:
        VisualChatConfig.from_preset("llama2-7b", parallel=parallel).validate(world_size=world)
    assert message in str(err.value)


def test_world_size_splits_into_tp_pp_and_the_rest_data_parallel():
    par = ParallelConfig.for_world(16, tp=2, pp=4, vpp=2)
    assert (par.tp, par.pp, par.dp, par.vpp, par.world_size) == (2, 4, 2, 2, 16)
    assert ParallelConfig.for_world(1) == ParallelConfig()
    assert ParallelConfig.for_world(4, pp=2, pp_layers=(1, 3)).pp_layers == (1, 3)
    with pytest.raises(ConfigError, match=r"world size 6 is not divisible by tp\(2\) x pp\(2\): launch a multiple"):
        ParallelConfig.for_world(6, tp=2, pp=2)
    with pytest.raises(ConfigError, match="parallel.tp=0 must be >= 1"):
        ParallelConfig.for_world(4, tp=0)
    with pytest.raises(ConfigError, match="world size 0 must be >= 1"):
        ParallelConfig.for_world(0)
    with pytest.raises(ConfigError, match=r"world size 3 != tp\(2\) x pp\(1\) x dp\(1\) = 2"):
        ParallelConfig(tp=2).check_world_size(3)


def test_tp_must_divide_query_groups_of_70b():
    with pytest.raises(ConfigError, match="does not divide num_query_groups=8"):
        VisualChatConfig.from_preset("llama2-70b", parallel=ParallelConfig(tp=16)).validate()
    VisualChatConfig.from_preset("llama2-70b", parallel=ParallelConfig(tp=8, pp=4)).validate(world_size=32)


@pytest.mark.parametrize("field,value", [("mode", "sparse"), ("modality_split", "q"), ("image_rows", "all"),
                                         ("combine", "max"), ("backend", "cuda")])
def test_attention_options_are_refused_with_the_allowed_set(field, value):
    with pytest.raises(ConfigError, match=f"attention.{field}={value!r} is not one of"):
        VisualChatConfig(attention=AttentionConfig(**{field: value})).validate()


@pytest.mark.parametrize("attention,message", [
    (AttentionConfig(backend="te", modality_split="kv"), "attention.modality_split='kv' needs backend='local'"),
    (AttentionConfig(backend="te", modality_norms=True), "attention.modality_norms needs backend='local'"),
])
def test_attention_combinations_transformer_engine_cannot_build_are_refused(attention, message):
    with pytest.raises(ConfigError, match=message):
        VisualChatConfig(attention=attention).validate()
    AttentionConfig(backend="te").validate()  # the plain TE recipe is fine


def test_check_choice_names_the_value_and_the_allowed_set():
    check_choice("x", "b", ("a", "b"))
    with pytest.raises(ConfigError, match=r"^x='c' is not one of \['a', 'b'\]$"):
        check_choice("x", "c", ("b", "a"))


def test_one_dtype_mapping_for_names_and_flags():
    assert DTYPES == {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    assert dtype_from_flags() == torch.float32 and dtype_name() == "fp32"
    assert dtype_from_flags(bf16=True) == torch.bfloat16 and dtype_from_flags(fp16=True) == torch.float16
    assert dtype_name(bf16=True, fp16=True) == "bf16"  # bf16 wins, as the trainer has always read the flags


def test_unknown_preset_and_exclusive_trainables():
    with pytest.raises(ConfigError, match="preset='llama3' is not one of"):
        VisualChatConfig.from_preset("llama3")
    with pytest.raises(ConfigError, match="exclusive"):
        VisualChatConfig(trainable=TrainableConfig(embeddings=True, new_token_rows_only=True)).validate()


def test_transformer_config_carries_parallel_sizes_and_llama_architecture():
    cfg = VisualChatConfig.from_preset("llama2-70b", parallel=ParallelConfig(tp=8, pp=4))
    tc = to_transformer_config(cfg, torch.bfloat16)
    assert (tc.tensor_model_parallel_size, tc.pipeline_model_parallel_size) == (8, 4)
    assert (tc.num_query_groups, tc.normalization, tc.gated_linear_unit, tc.add_bias_linear) == (
        8, "RMSNorm", True, False)
    assert tc.bf16 and tc.params_dtype == torch.bfloat16 and tc.hidden_dropout == 0.0


def test_explicit_split_becomes_a_megatron_layout():
    layout = pipeline_layout(ParallelConfig(pp=2, pp_layers=(1, 3)))
    assert layout == [["embedding", "decoder"], ["decoder", "decoder", "decoder", "loss"]]
