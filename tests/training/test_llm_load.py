"""End to end from a HF LLaMA: convert at TP=2, train VisualChat on top with the LLM frozen and K/V split for
images, export. The frozen text weights come out exactly as HF wrote them; the image side starts as their copy, so
the first loss is the one the same LLaMA converted at TP=1 gives without a split; any pipeline split gives the same
losses."""

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


def _argv(tmp, *extra):
    return ["--synthetic", "32", "--data-cache-dir", str(tmp / "data"), "--micro-batch-size", "2",
            "--global-batch-size", "4", "--seq-length", "160", "--train-iters", "2", "--no-progress-bar", *extra]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("llm_load")


@pytest.fixture(scope="module")
def hf(tmp):
    return _save_tiny_llama(tmp / "hf")


@pytest.fixture(scope="module")
def tp1_checkpoint(tmp, hf):
    from megatron_visualchat.cli import main as cli

    assert cli(["hf-to-megatron", "--hf-dir", str(tmp / "hf"), "--out", str(tmp / "mg1"), "--dtype", "fp32"]) == 0
    return tmp / "mg1"


@pytest.fixture(scope="module")
def tp1_losses(tmp, tp1_checkpoint):
    """TP=1, PP=1, no split, projector trained."""
    return run_parallel(_train, args=(_argv(tmp, "--llm-load", str(tp1_checkpoint), "--trainable", "projector"),))[0][
        "losses"]


def test_train_on_a_converted_frozen_llama(tmp, hf, tp1_losses):
    from megatron_visualchat.cli import main as cli

    assert cli(["hf-to-megatron", "--hf-dir", str(tmp / "hf"), "--out", str(tmp / "mg2"), "--tp", "2",
                "--pp", "1", "--dtype", "fp32"]) == 0
    argv = _argv(tmp, "--tensor-model-parallel-size", "2", "--llm-load", str(tmp / "mg2"), "--modality-split", "kv",
                 "--trainable", "projector,image_projections", "--export-dir", str(tmp / "chat"))
    result = run_parallel(_train, tp=2, args=(argv,))[0]
    # Before any update the image K/V are the text K/V: the TP=1 text model's first loss (measured: equal).
    assert result["losses"][0] == pytest.approx(tp1_losses[0], rel=2e-7)
    exported = load_file(str(tmp / "chat" / "model.safetensors"))
    torch.testing.assert_close(exported["language_model.decoder.layers.1.mlp.linear_fc2.weight"],
                               hf["model.layers.1.mlp.down_proj.weight"], rtol=0, atol=0)
    torch.testing.assert_close(exported["language_model.embedding.word_embeddings.weight"][:256],
                               hf["model.embed_tokens.weight"], rtol=0, atol=0)
    # image-side K/V: a copy of the text K/V rows, then moved by two optimizer steps
    qkv = exported["language_model.decoder.layers.0.self_attention.linear_qkv.weight"].view(2, 4, 16, 64)
    image_kv = exported["language_model.decoder.layers.0.self_attention.linear_qkv.image_weight"].view(2, 2, 16, 64)
    delta = (image_kv - qkv[:, 2:]).abs().max()
    assert 0 < delta < 0.05


def test_frozen_llm_run_is_the_same_at_an_uneven_pipeline_split(tmp, tp1_checkpoint, tp1_losses):
    """Converted once at TP=1, loaded at PP=1 and at PP=2 with layers split 1+3 (a lighter first stage, as for
    the vision encoder): the same weights and data give the same losses."""
    argv = _argv(tmp, "--llm-load", str(tp1_checkpoint), "--trainable", "projector",
                 "--pipeline-model-parallel-size", "2", "--pipeline-layers", "1,3")
    split = run_parallel(_train, pp=2, pp_layers=(1, 3), args=(argv,))[0]
    assert split["losses"] == pytest.approx(tp1_losses, rel=1e-5)
