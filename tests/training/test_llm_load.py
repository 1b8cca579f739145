"""End to end from a HF LLaMA: convert at TP=2, train VisualChat on top with the LLM frozen and K/V split for
images, export. The frozen text weights come out exactly as HF wrote them; the image side starts as their copy."""

import pytest
import torch
from safetensors.torch import load_file

from megatron_visualchat.testing.distributed import run_parallel


def _save_tiny_llama(path):
    """Random LlamaForCausalLM with the `tiny` preset's architecture."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4,
                         vocab_size=256, intermediate_size=128, max_position_embeddings=512, rms_norm_eps=1e-5,
                         rope_theta=10000.0, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _train(argv):
    from megatron_visualchat.training.arguments import parse_args
    from megatron_visualchat.training.pretrain import train

    return train(parse_args(argv))


def test_train_on_a_converted_frozen_llama(tmp_path):
    from megatron_visualchat.cli import main as cli

    hf = _save_tiny_llama(tmp_path / "hf")
    assert cli(["hf-to-megatron", "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "mg"), "--tp", "2",
                "--pp", "1", "--dtype", "fp32"]) == 0
    argv = ["--synthetic", "32", "--data-cache-dir", str(tmp_path / "data"), "--micro-batch-size", "2",
            "--global-batch-size", "4", "--seq-length", "160", "--train-iters", "2", "--no-progress-bar",
            "--tensor-model-parallel-size", "2", "--llm-load", str(tmp_path / "mg"), "--modality-split", "kv",
            "--trainable", "projector,image_projections", "--export-dir", str(tmp_path / "chat")]
    result = run_parallel(_train, tp=2, args=(argv,))[0]
    assert all(torch.isfinite(torch.tensor(result["losses"])))
    exported = load_file(str(tmp_path / "chat" / "model.safetensors"))
    torch.testing.assert_close(exported["language_model.decoder.layers.1.mlp.linear_fc2.weight"],
                               hf["model.layers.1.mlp.down_proj.weight"], rtol=0, atol=0)
    torch.testing.assert_close(exported["language_model.embedding.word_embeddings.weight"][:256],
                               hf["model.embed_tokens.weight"], rtol=0, atol=0)
    # image-side K/V: a copy of the text K/V rows, then moved by two optimizer steps
    qkv = exported["language_model.decoder.layers.0.self_attention.linear_qkv.weight"].view(2, 4, 16, 64)
    image_kv = exported["language_model.decoder.layers.0.self_attention.linear_qkv.image_weight"].view(2, 2, 16, 64)
    delta = (image_kv - qkv[:, 2:]).abs().max()
    assert 0 < delta < 0.05


def test_frozen_llm_run_is_the_same_at_an_uneven_pipeline_split(tmp_path):
    """Converted once at TP=1, loaded at PP=1 and at PP=2 with layers split 1+3 (a lighter first stage, as for
    the vision encoder): the same weights and data give the same losses."""
    from megatron_visualchat.cli import main as cli

    _save_tiny_llama(tmp_path / "hf")
    assert cli(["hf-to-megatron", "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "mg"),
                "--dtype", "fp32"]) == 0
    argv = ["--synthetic", "32", "--data-cache-dir", str(tmp_path / "data"), "--micro-batch-size", "2",
            "--global-batch-size", "4", "--seq-length", "160", "--train-iters", "2", "--no-progress-bar",
            "--llm-load", str(tmp_path / "mg"), "--trainable", "projector"]
    single = run_parallel(_train, args=(argv,))[0]["losses"]
    split = run_parallel(_train, pp=2, pp_layers=(1, 3),
                         args=(argv + ["--pipeline-model-parallel-size", "2", "--pipeline-layers", "1,3"],))[0]
    assert split["losses"] == pytest.approx(single, rel=1e-5)
