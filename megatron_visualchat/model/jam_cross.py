"""JAM-Cross (Aiello et al., ICLR 2024): two decoder towers of one architecture that read the same token ids,
bi-directional gated cross-attention between their layer outputs, and one joint output head (docs/fusion.md).

After every ``cross_interval``-th layer l (megatron's 1-based global numbers K, 2K, ...) both directions are
computed from the two layer-l outputs: ``h_A += tanh(g_AB) * Attn(q = norm(h_A), kv = norm(h_B))`` and the same
for B from A. The attention is causal over positions within each packed sample (the MMCA core attention in
``causal`` mode over the token codes) with the towers' rotary embedding on queries and keys; its projections are
megatron-core's column/row-parallel linears (``GatedCrossAttention``, gates initialised at 0). The joint head is
``[W_A | W_B]`` over ``[h_A ; h_B]``: tower A's own output layer plus ``tower_b_output_layer``, which starts at
zero, so at step 0 (gates 0, W_B 0) the logits are parent A's exactly.

Pipeline parallelism: every stage holds the same layer range of both towers (and the cross links of those
layers); the tensor passed between stages is ``[h_A ; h_B]`` stacked along the sequence, ``[2s, b, h]``.
Text and image codes only: a batch with images (``<image>`` positions or pixels) is refused.

KV-cached decode (chat, eval-replay, serve) runs on megatron-core's static inference context, which keys each
attention's K/V buffers by layer number, a number both towers and both link directions share. Each of the four
streams (tower A, tower B, link A-from-B, link B-from-A) therefore sees the context through ``StreamContext``,
which shifts its layer numbers into a range of its own (stream k: ``k * num_layers + l``); the buffers stay in the
one dict, so copying a cache copies them all. A link's keys/values are the other tower's layer-l outputs, which
grow by the new positions each forward, exactly like self-attention's: megatron-core's own bookkeeping appends
them (``LinkAttention``), and the query and key rotations use the cache offset.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import CrossAttention, CrossAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType, ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_visualchat.config import TrainableConfig, VisualChatConfig, to_transformer_config
from megatron_visualchat.model.cross_attention import GatedCrossAttention, has_cross_attention
from megatron_visualchat.model.gpt import build_gpt_model, stage_flags
from megatron_visualchat.model.layer_specs import get_mmca_block_spec, get_mmca_layer_spec
from megatron_visualchat.model.mmca.core_attention import MMCACoreAttention
from megatron_visualchat.model.norms import RMSNorm
from megatron_visualchat.model.token_codes import MODALITY_IMAGE, unpack_token_codes

NEW_WEIGHTS = ("cross_layers.", "tower_b_output_layer.")  # what fusion adds: always trained


STREAMS = ("tower_a", "tower_b", "a_from_b", "b_from_a")  # KV-cache slot ranges, in this order


class _ShiftedSlots:
    """megatron-core's ``key_value_memory_dict`` seen with every layer number shifted by ``offset`` (the static
    path reads and writes it only by ``in``, ``[]`` and ``[] =``)."""

    def __init__(self, slots: dict, offset: int):
        self.slots, self.offset = slots, offset

    def __contains__(self, number) -> bool:
        return number + self.offset in self.slots

    def __getitem__(self, number):
        return self.slots[number + self.offset]

    def __setitem__(self, number, buffers) -> None:
        self.slots[number + self.offset] = buffers


class StreamContext:
    """The static inference context as one stream of the fused model sees it: the shared offsets and sizes, its
    own K/V slots (``STREAMS``). Tower A uses the context itself."""

    def __init__(self, context, stream: str, num_layers: int):
        self._context = context
        self.key_value_memory_dict = _ShiftedSlots(context.key_value_memory_dict, STREAMS.index(stream) * num_layers)

    def __getattr__(self, name):
        return getattr(self._context, name)


class LinkAttention(GatedCrossAttention):
    """A link direction's gated attention. Its keys/values (the other tower's states) grow with every decoded
    token like self-attention's, so in decode megatron-core's own K/V bookkeeping keeps them (in the slots of the
    ``StreamContext`` it is given), not ``GatedCrossAttention``'s per-image store."""

    def forward(self, hidden_states, attention_mask, key_value_states=None, inference_context=None, **kwargs):
        output, bias = CrossAttention.forward(self, hidden_states, attention_mask, key_value_states=key_value_states,
                                              inference_context=inference_context, **kwargs)
        scale = torch.tanh(self.gate).to(output.dtype)
        return output * scale, None if bias is None else bias * scale


class TowerCrossAttention(MegatronModule):
    """One direction of a cross link: the tower's hidden states attend causally to the other tower's."""

    def __init__(self, config, layer_number: int):
        super().__init__(config=config)
        self.pre_cross_attn_layernorm = RMSNorm(config, config.hidden_size, config.layernorm_epsilon)
        self.kv_layernorm = RMSNorm(config, config.hidden_size, config.layernorm_epsilon)
        spec = ModuleSpec(LinkAttention, params={"attn_mask_type": AttnMaskType.arbitrary},
                          submodules=CrossAttentionSubmodules(
                              linear_q=ColumnParallelLinear, linear_kv=ColumnParallelLinear,
                              core_attention=ModuleSpec(MMCACoreAttention, params={"mode": "causal"}),
                              linear_proj=RowParallelLinear))
        self.cross_attention = build_module(spec, config=config, layer_number=layer_number)

    def forward(self, hidden, other, codes, rotary_pos_emb, inference_context=None):
        out, bias = self.cross_attention(self.pre_cross_attn_layernorm(hidden), attention_mask=codes,
                                         key_value_states=self.kv_layernorm(other), rotary_pos_emb=rotary_pos_emb,
                                         inference_context=inference_context)
        return hidden + (out if bias is None else out + bias)


class CrossLink(MegatronModule):
    """Both directions after one layer, each computed from the two layer outputs (neither sees the other's update)."""

    def __init__(self, config, layer_number: int):
        super().__init__(config=config)
        self.a_from_b = TowerCrossAttention(config, layer_number)
        self.b_from_a = TowerCrossAttention(config, layer_number)

    def forward(self, h_a, h_b, codes, rotary_pos_emb, contexts=None):
        """``contexts``: in decode, the ``StreamContext`` of each direction (``a_from_b``, ``b_from_a``)."""
        contexts = contexts or {}
        return (self.a_from_b(h_a, h_b, codes, rotary_pos_emb, contexts.get("a_from_b")),
                self.b_from_a(h_b, h_a, codes, rotary_pos_emb, contexts.get("b_from_a")))


class JamCrossModel(MegatronModule):
    """This rank's stage of the dual-tower model; the forward signature is VisualChatModel's, so the trainer's step,
    schedules, checkpoints, exports and chat's KV-cached generation take it unchanged. State-dict names:
    ``tower_a.*`` / ``tower_b.*`` (megatron GPTModel names, so converted checkpoints load into each:
    ``checkpoint/fuse_cross.load_towers``), ``cross_layers.<global layer number>.*`` and
    ``tower_b_output_layer.weight``."""

    vision = None  # no vision tower: chat and serve refuse images for it (inference/session.py, serve_engine.py)

    def __init__(self, cfg: VisualChatConfig, *, params_dtype: torch.dtype = torch.float32, vp_stage=None,
                 transformer_overrides=None):
        config = to_transformer_config(cfg, params_dtype, **(transformer_overrides or {}))
        if config.recompute_granularity is not None:
            raise ValueError("a jam-cross model runs its layers one by one between the cross links: activation "
                             "recompute (--recompute-granularity) is not supported for it yet; drop the flag")
        config.variable_seq_lengths = True  # the p2p tensor is [2s, b, h], not megatron's [s, b, h]
        super().__init__(config=config)
        self.cfg = cfg
        self.model_type = ModelType.encoder_or_decoder  # read by megatron-core's schedules
        self.pre_process, self.post_process = stage_flags(vp_stage)
        spec = get_mmca_block_spec(config, get_mmca_layer_spec(cfg.attention), vp_stage)
        self.tower_a = build_gpt_model(cfg, spec, params_dtype=params_dtype, vp_stage=vp_stage,
                                       transformer_config=config)
        self.tower_b = build_gpt_model(cfg, spec, params_dtype=params_dtype, vp_stage=vp_stage,
                                       transformer_config=config)
        offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
        links = {}
        for number in range(offset + 1, offset + get_num_layers_to_build(config, vp_stage=vp_stage) + 1):
            if has_cross_attention(number, cfg.fusion.cross_interval):
                with torch.random.fork_rng(devices=[]):  # the same initial weights at every pipeline layout
                    torch.manual_seed(torch.initial_seed() + number)
                    links[str(number)] = CrossLink(config, number)
        self.cross_layers = torch.nn.ModuleDict(links)
        if self.post_process:
            self.tower_b.output_layer = None  # the joint head's B half replaces it
            self.tower_b_output_layer = ColumnParallelLinear(
                config.hidden_size, cfg.llm.padded_vocab_size(cfg.parallel.tp), config=config,
                init_method=torch.nn.init.zeros_, bias=False, gather_output=False)
        self._received = None

    @property
    def share_embeddings_and_output_weights(self) -> bool:  # read by megatron-core's finalize_model_grads
        return False

    def set_input_tensor(self, input_tensor) -> None:
        self._received = input_tensor[0] if isinstance(input_tensor, list) else input_tensor

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels=None, pixel_values=None, num_images=None, inference_context=None,
                runtime_gather_output=None):
        """As ``VisualChatModel.forward``: per-token loss [b, s] with labels on the last stage, logits [b, s, V/TP]
        without, ``[h_A ; h_B]`` [2s, b, h] on other stages."""
        _check_text_only(attention_mask, pixel_values)
        s = tokens.shape[1]
        contexts = {} if inference_context is None else {
            stream: StreamContext(inference_context, stream, self.config.num_layers) for stream in STREAMS[1:]}
        if self.pre_process:
            h_a = self.tower_a.embedding(input_ids=tokens, position_ids=position_ids)
            h_b = self.tower_b.embedding(input_ids=tokens, position_ids=position_ids)
        else:
            received, self._received = self._received, None
            h_a, h_b = received[:s], received[s:]
        # Both towers: one architecture, one rotary base; in decode it covers the cached positions too.
        rotary = self.tower_a.rotary_pos_emb(s + (inference_context.sequence_len_offset if contexts else 0))
        for layer_a, layer_b in zip(self.tower_a.decoder.layers, self.tower_b.decoder.layers):
            h_a, _ = layer_a(hidden_states=h_a, attention_mask=attention_mask, rotary_pos_emb=rotary,
                             inference_context=inference_context)
            h_b, _ = layer_b(hidden_states=h_b, attention_mask=attention_mask, rotary_pos_emb=rotary,
                             inference_context=contexts.get("tower_b"))
            number = str(layer_a.layer_number)
            if number in self.cross_layers:
                h_a, h_b = self.cross_layers[number](h_a, h_b, attention_mask, rotary, contexts)
        if not self.post_process:
            return torch.cat([h_a, h_b], dim=0)
        h_a, h_b = self.tower_a.decoder.final_layernorm(h_a), self.tower_b.decoder.final_layernorm(h_b)
        # A's output layer masks the padded vocabulary to -inf (model/gpt.py); B's half adds to it.
        logits, _ = self.tower_a.output_layer(h_a, runtime_gather_output=runtime_gather_output)
        logits_b, _ = self.tower_b_output_layer(h_b, runtime_gather_output=runtime_gather_output)
        logits = logits + logits_b
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        return self.tower_a.compute_language_model_loss(labels, logits)


def _check_text_only(codes: torch.Tensor, pixel_values) -> None:
    if (pixel_values is not None and pixel_values.shape[0]) or bool(
            (unpack_token_codes(codes).modality == MODALITY_IMAGE).any()):
        raise ValueError("a jam-cross model reads text (and image codes as tokens) only, but this batch has images: "
                         "train it on text-only data, or use a VisualChat model for images")


def apply_jam_cross_trainable(model: JamCrossModel, trainable: TrainableConfig) -> list[str]:
    """The fusion's new weights (cross links, the B half of the head) always train; the towers train as the LLM
    does under ``trainable`` (``llm``; ``embeddings``: both towers' input embeddings). Returns the trainable names."""
    names = []
    for name, p in model.named_parameters():
        if name.startswith(NEW_WEIGHTS):
            on = True
        elif "word_embeddings" in name:
            on = trainable.llm or trainable.embeddings
        else:
            on = trainable.llm
        p.requires_grad_(on)
        if on:
            names.append(name)
    return names
