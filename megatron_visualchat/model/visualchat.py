"""VisualChatModel: vision encoder -> projector -> splice into word embeddings -> GPT decoder with MMCA.

Pipeline placement (docs/design/architecture.md): the first stage holds the vision tower, the word embeddings and
its decoder layers; later stages only their decoder layers; the last stage the output layer and loss. Token codes
come with every stage's batch (``attention_mask`` slot), so MMCA works on every stage.

Mode ``cross`` (docs/design/cross_attention.md): nothing is spliced; the projector's output becomes the gated
cross-attention layers' context, and every stage but the last sends it on behind its hidden states in the one p2p
tensor (``[s + M*T, b, h]``; megatron-core exchanges the shape first, ``variable_seq_lengths``), so later stages'
cross layers see it and the projector's gradient comes back the same way.

Sequence parallelism: the embedding returns the full sequence (megatron would scatter it right away), the images
are spliced in, and only then is the result scattered to the TP ranks' sequence shards.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from megatron_visualchat.config import ConfigError, TrainableConfig, VisualChatConfig, to_transformer_config
from megatron_visualchat.model.cross_attention import check_images_match_codes, image_context, image_key_values
from megatron_visualchat.model.gpt import build_gpt_model, stage_flags
from megatron_visualchat.model.layer_specs import get_mmca_block_spec, get_mmca_layer_spec
from megatron_visualchat.model.lora import add_vision_lora, is_lora_parameter
from megatron_visualchat.model.mmca.context_parallel import whole_sequence_codes
from megatron_visualchat.model.splice import splice_image_embeddings
from megatron_visualchat.model.token_codes import unpack_token_codes
from megatron_visualchat.model.vision import build_vision_tower


class VisualChatModel(MegatronModule):
    def __init__(self, cfg: VisualChatConfig, *, params_dtype: torch.dtype = torch.float32,
                 vp_stage: Optional[int] = None, transformer_overrides: Optional[dict] = None):
        """``transformer_overrides``: extra megatron ``TransformerConfig`` fields (e.g. recompute settings)."""
        cross = cfg.attention.mode == "cross"
        config = to_transformer_config(cfg, params_dtype, **(transformer_overrides or {}))
        # The p2p tensor is [s + M*T, b, h], M varying by batch. Set after TransformerConfig's checks, whose only
        # objection concerns MoE token dispatch, which this model has none of.
        config.variable_seq_lengths = config.variable_seq_lengths or cross
        super().__init__(config=config)
        self.cross = cross
        self.model_type = ModelType.encoder_or_decoder  # read by megatron-core's schedules
        self.cfg = cfg
        self.pre_process, self.post_process = stage_flags(vp_stage)
        spec = get_mmca_block_spec(config, get_mmca_layer_spec(cfg.attention, cfg.lora), vp_stage,
                                   cfg.attention.cross_attention_interval if self.cross else None,
                                   cfg.llm.rope_base)
        self._received = None  # cross mode, later stages: the p2p tensor, split in forward
        self.language_model = build_gpt_model(cfg, spec, params_dtype=params_dtype, vp_stage=vp_stage,
                                              transformer_config=config, scatter_embeddings=False)
        self.vision = None
        if self.pre_process:
            v = cfg.vision
            # Seeded from the run's seed, not from wherever the generator stands after this stage's decoder
            # layers: the same projector initialisation at every pipeline layout.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(torch.initial_seed())
                self.vision = build_vision_tower(
                    v.encoder, v.projector, cfg.llm.hidden_size,
                    freeze_encoder=v.freeze_encoder and not cfg.trainable.vision_encoder,
                    projector_options=v.projector_options, encoder_weights=v.encoder_weights,
                    encoder_options=v.encoder_options, projector_weights=v.projector_weights,
                ).to(params_dtype)
                if cfg.lora.vision_rank:
                    if self.vision.encoder.unused_blocks:  # their adapters would get no gradient
                        raise ConfigError(f"vision LoRA adapts every encoder block, but feature_layer="
                                          f"{v.encoder_options['feature_layer']} leaves the last "
                                          f"{self.vision.encoder.unused_blocks} unused: drop --vision-lora-rank or "
                                          "the feature_layer option")
                    add_vision_lora(self.vision.encoder, cfg.lora)

    @property
    def share_embeddings_and_output_weights(self) -> bool:  # read by megatron-core's finalize_model_grads
        return self.language_model.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def set_input_tensor(self, input_tensor) -> None:
        if self.cross and not self.pre_process:
            self._received = input_tensor[0] if isinstance(input_tensor, list) else input_tensor
            return
        self.language_model.set_input_tensor(input_tensor)

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: Optional[torch.Tensor] = None, pixel_values: Optional[torch.Tensor] = None,
                num_images: Optional[torch.Tensor] = None, inference_context=None,
                runtime_gather_output: Optional[bool] = None):
        """``attention_mask`` carries the packed token codes; in KV-cache decode they cover the cached positions
        too and ``tokens`` are the last of them. Returns per-token loss [b, s] with labels on the last stage,
        logits [b, s, V/TP] without (gathered with ``runtime_gather_output``; vocabulary padding is -inf, see
        ``model/gpt.py``), hidden states [s, b, h] on other stages."""
        decoder_input = image_embeds = None
        tp = self.cfg.parallel.tp
        if self.config.sequence_parallel and tokens.shape[1] % tp:
            raise ValueError(f"sequence parallelism splits the sequence over the {tp} tensor-parallel ranks, but "
                             f"this batch has {tokens.shape[1]} positions: pad batches to a multiple of {tp} "
                             "(the trainer pads every batch to --seq-length, which must be a multiple of the TP "
                             "size)")
        if self.pre_process:
            embeds = self.language_model.embedding(input_ids=tokens, position_ids=position_ids)
            if pixel_values is None:  # a text-only batch
                side = self.vision.encoder.image_size
                pixel_values = embeds.new_zeros(0, 3, side, side)
            image_embeds = self.vision(pixel_values.to(embeds.dtype))
            decoder_input = embeds  # cross mode: nothing is spliced
            if not self.cross:
                # Under context parallelism tokens are this rank's chunks: images go by whole-sequence codes.
                codes, positions = whole_sequence_codes(attention_mask)
                modality = unpack_token_codes(codes).modality
                if positions is None:
                    modality = modality[:, -tokens.shape[1]:]
                decoder_input = splice_image_embeddings(embeds, image_embeds, modality, num_images, positions)
            if self.config.sequence_parallel:
                # A clone, as megatron's embedding does: the shard is a view that would keep the full sequence alive.
                decoder_input = scatter_to_sequence_parallel_region(decoder_input).clone()
        if self.cross:
            return self._forward_cross(tokens, position_ids, attention_mask, decoder_input, image_embeds, labels,
                                       num_images, inference_context, runtime_gather_output)
        return self.language_model(tokens, position_ids, attention_mask, decoder_input=decoder_input,
                                   labels=labels, inference_context=inference_context,
                                   runtime_gather_output=runtime_gather_output)

    def _forward_cross(self, tokens, position_ids, attention_mask, decoder_input, image_embeds, labels, num_images,
                       inference_context, runtime_gather_output):
        """Cross mode: the image context comes from the projector (first stage) or behind the hidden states in the
        received p2p tensor; stages before the last send it on the same way. In KV-cached decode the context holds
        only this forward's new images; the cache's ``ImageKeyValues`` keeps the K/V of the earlier ones."""
        s, b = tokens.shape[1], tokens.shape[0]
        if inference_context is None:
            check_images_match_codes(attention_mask, num_images)
        else:
            image_key_values(inference_context).stage(attention_mask, s, num_images)
        if self.pre_process:
            context = image_context(image_embeds, num_images, b)
        else:
            received, self._received = self._received, None
            self.language_model.set_input_tensor(received[:s])
            context = received[s:]
        # The cross layers read the codes (their core derives the mask and image positions, cross_plan).
        output = self.language_model(tokens, position_ids, attention_mask, decoder_input=decoder_input,
                                     labels=labels, inference_context=inference_context,
                                     runtime_gather_output=runtime_gather_output,
                                     extra_block_kwargs={"context": context, "context_mask": attention_mask})
        return output if self.post_process else torch.cat([output, context], dim=0)


def apply_trainable_policy(model: VisualChatModel, trainable: TrainableConfig,
                           new_token_rows: tuple[int, ...] = (), new_output_rows: tuple[int, ...] = ()) -> list[str]:
    """Set requires_grad by the policy; returns the trainable parameter names. ``embeddings`` trains the input
    embeddings, which (untied from the output layer, as in LLaMA-2) is DS-VisualChat's trainable embedding copy:
    the base rows stay in the frozen LLM checkpoint. ``new_token_rows_only`` trains just the rows of added
    tokens (gradients of other rows are masked to zero), and of an untied output layer the ``new_output_rows``
    (tokens the model must learn to write: the image vocabulary). LoRA adapters always train."""
    train_output_rows = (trainable.new_token_rows_only and not trainable.llm and bool(new_output_rows)
                         and not model.share_embeddings_and_output_weights)
    names = []
    for name, p in model.named_parameters():
        if is_lora_parameter(name):
            on = True
        elif name.startswith("vision.projector."):
            on = trainable.projector
        elif name.startswith("vision.encoder."):
            on = trainable.vision_encoder
        elif name.endswith("image_weight") or ".cross_attention." in name or ".pre_cross_attn_layernorm." in name:
            on = trainable.image_projections or trainable.llm
        elif "word_embeddings" in name:
            on = trainable.llm or trainable.embeddings or trainable.new_token_rows_only
        elif name.endswith("output_layer.weight"):
            on = trainable.llm or train_output_rows
        else:
            on = trainable.llm
        p.requires_grad_(on)
        if on:
            names.append(name)
    if trainable.new_token_rows_only and not trainable.llm and model.pre_process:
        if not new_token_rows:
            raise ValueError("trainable.new_token_rows_only needs the ids of the added tokens (new_token_rows)")
        embedding = model.language_model.embedding.word_embeddings
        _mask_vocab_rows(embedding.weight, embedding.vocab_start_index, new_token_rows)
    if train_output_rows and model.post_process:
        output = model.language_model.output_layer
        _mask_vocab_rows(output.weight, output.tp_group.rank() * output.output_size_per_partition, new_output_rows)
    return names


def _mask_vocab_rows(weight: torch.Tensor, start: int, rows: tuple[int, ...]) -> None:
    """Only the given (global) vocabulary rows of a vocab-parallel ``weight`` receive gradient; this rank holds rows
    [start, start + len(weight))."""
    mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
    for r in rows:
        if start <= r < start + weight.shape[0]:
            mask[r - start] = 1
    weight.register_hook(lambda g: g * mask)
