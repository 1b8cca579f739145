"""Tiny random HF LLaMA checkpoints (GQA, padded vocab, non-default rope base and eps) saved by transformers."""

import json
from pathlib import Path

import pytest
import torch

TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4, vocab_size=250,
            intermediate_size=128, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=20000.0)


def save_tiny_llama(path: Path, *, dtype=torch.float32, seed: int = 0, tie: bool = False,
                    max_shard_size: str = "40KB") -> Path:
    """A random LlamaForCausalLM in several safetensors shards + index, with a tokenizer file to carry along.
    Norm weights are randomised too, so a swapped or dropped norm changes the output."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=tie))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(1.0, 0.1) if p.ndim == 1 else p.normal_(0.0, 0.08)
    model.to(dtype).save_pretrained(path, max_shard_size=max_shard_size)
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    return path


def hf_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> Path:
    """fp32 tiny LLaMA, untied embeddings."""
    return save_tiny_llama(tmp_path_factory.mktemp("hf") / "tiny")


@pytest.fixture(scope="session")
def tiny_hf_bf16(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("hf") / "tiny_bf16", dtype=torch.bfloat16, seed=1)
