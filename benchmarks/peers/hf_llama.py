"""The HF-transformers training step DS-VisualChat runs: LlamaForCausalLM (SDPA, causal), the LLM frozen, images
spliced into the input embeddings. The GPU suite's peer of the megatron-core VisualChat step.

It takes the same vision tower module (frozen encoder + trainable projector) and the same batch as our step, so
the two steps differ only in the language model: ``LlamaForCausalLM`` with ``attn_implementation="sdpa"`` (one
causal softmax; DS-VC's eager MMCA is row a's peer) against megatron-core's GPTModel with MMCA.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from megatron_visualchat.config import LLMConfig
from megatron_visualchat.model.splice import splice_image_embeddings
from megatron_visualchat.model.token_codes import unpack_token_codes

IGNORE_INDEX = -100  # HF's cross-entropy ignore label


def build_hf_llama(llm: LLMConfig, vocab_size: int, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    """Random-weight LlamaForCausalLM of ``llm``'s shape (RoPE base 10000, HF's default and LLaMA-2's), built on
    ``device`` directly, every weight frozen."""
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=llm.hidden_size, intermediate_size=llm.ffn_hidden_size,
        num_hidden_layers=llm.num_layers, num_attention_heads=llm.num_attention_heads,
        num_key_value_heads=llm.query_groups, max_position_embeddings=llm.max_position_embeddings,
        rms_norm_eps=llm.rms_norm_eps, tie_word_embeddings=not llm.untie_embeddings,
    )
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.requires_grad_(False).train()


def hf_visualchat_step(model: LlamaForCausalLM, vision: torch.nn.Module, batch: dict) -> None:
    """Forward and backward of one batch of ``testing.batches.visualchat_batch`` form (codes packed in
    ``attention_mask``); gradients reach the projector only, and are dropped."""
    embeds = model.get_input_embeddings()(batch["tokens"]).transpose(0, 1)  # [s, b, h], the splice's layout
    modality = unpack_token_codes(batch["attention_mask"]).modality
    images = vision(batch["pixel_values"].to(embeds.dtype))
    embeds = splice_image_embeddings(embeds, images, modality, batch["num_images"]).transpose(0, 1)
    labels = batch["labels"].masked_fill(batch["loss_mask"] == 0, IGNORE_INDEX)
    model(inputs_embeds=embeds, labels=labels).loss.backward()
    vision.zero_grad(set_to_none=True)
