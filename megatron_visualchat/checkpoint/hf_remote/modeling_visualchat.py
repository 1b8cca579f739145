"""A megatron_visualchat chat model for transformers (``trust_remote_code=True``), written by ``export-hf``.

Depends only on torch and transformers (written for transformers 5). The pieces are transformers' own where it has
them: a CLIP or SigLIP vision model (QWen-VL's encoder, which transformers lacks, is written out below), then the
chat model's projector, its image features put in place of the ``<image>`` tokens (each image
``image_seq_length`` of them, in order), then transformers' ``LlamaModel`` with two changes:

* attention is a registered attention function that computes MMCA (Multi-Modal Causal Attention) from token codes
  derived from the input ids (modality: pad / text / image; the image each image token belongs to). A text token
  attends to earlier text and to earlier images through two separate softmaxes whose outputs are added
  (``combine="sum"``) or averaged over the non-empty ones (``"mean"``); an image token attends to itself
  (``image_rows="self"``), to itself plus earlier text (``"self+text"``) or to every token of its own image
  (``"image"``); ``attention_mode="causal"`` is plain causal attention over non-pad tokens. Two softmaxes cannot be
  one additive mask, hence the function. Pads are never attended and output 0.
* ``modality_split`` / ``modality_norms``: image tokens go through their own projection (``image_weight`` beside
  the LLM's ``weight`` of q/k/v/o_proj) and norm weights; text tokens through the LLM's.

``generate`` works with the KV cache: ``prepare_inputs_for_generation`` hands ``forward`` the ids of all positions
so far (``history_ids``), from which the codes of the cached keys are recomputed each step. Each row is one
conversation; pads (attention mask 0) are never attended. megatron_visualchat checks one row per batch against its
own chat.
"""

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, GenerationMixin, LlamaModel, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import AttentionInterface

from .configuration_visualchat import QwenVisionConfig, VisualChatConfig

ATTENTION = "megatron_visualchat_mmca"
PAD, TEXT, IMAGE = 0, 1, 2
SPLIT_PROJECTIONS = {"none": (), "kv": ("k_proj", "v_proj"), "qkv": ("q_proj", "k_proj", "v_proj"),
                     "qkvo": ("q_proj", "k_proj", "v_proj", "o_proj")}


class Codes(NamedTuple):
    """What each key position is ([B, L_keys]) and the attention options, handed to every layer's attention."""

    modality: torch.Tensor
    image_id: torch.Tensor
    mode: str
    image_rows: str
    combine: str


def token_codes(ids: torch.Tensor, attention_mask: Optional[torch.Tensor], image_token: int, per_image: int):
    """(modality, image_id) [B, L] of ``ids``: image tokens, pads (``attention_mask`` 0) and text; images numbered
    in order of appearance in each row, ``per_image`` tokens each; image_id -1 off images."""
    is_image = ids == image_token
    modality = torch.where(is_image, IMAGE, TEXT)
    if attention_mask is not None:
        modality = modality.masked_fill(attention_mask[:, -ids.shape[1]:] == 0, PAD)
    image_id = torch.where(is_image, torch.div(is_image.cumsum(1) - 1, per_image, rounding_mode="floor"), -1)
    return modality, image_id


def _key_sets(codes: Codes, len_q: int) -> list[torch.Tensor]:
    """One boolean key set [B, Lq, Lk] per softmax branch; the queries are the last ``len_q`` key positions."""
    len_k = codes.modality.shape[1]
    pos_k = torch.arange(len_k, device=codes.modality.device)
    pos_q = pos_k[len_k - len_q:]
    q_mod, k_mod = codes.modality[:, pos_q, None], codes.modality[:, None, :]
    not_after = pos_k[None, None, :] <= pos_q[None, :, None]
    if codes.mode == "causal":
        return [(q_mod != PAD) & (k_mod != PAD) & not_after]
    text_q, image_q, text_k, image_k = q_mod == TEXT, q_mod == IMAGE, k_mod == TEXT, k_mod == IMAGE
    if codes.image_rows == "image":  # every token of the query's own image, before and after it
        own = codes.image_id[:, pos_q, None] == codes.image_id[:, None, :]
    else:
        own = pos_k[None, None, :] == pos_q[None, :, None]
    text_rows = (text_q | image_q) if codes.image_rows == "self+text" else text_q
    before = pos_k[None, None, :] < pos_q[None, :, None]
    return [text_rows & text_k & not_after, image_k & ((text_q & before) | (image_q & own))]


def mmca_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, visualchat_codes=None,
                   **kwargs):
    """transformers' attention-function interface: query [B, Hq, Lq, D], key/value [B, Hkv, Lk, D] (all cached
    positions) -> ([B, Lq, Hq, D], None). Math in float32; an empty key set contributes exactly 0."""
    if visualchat_codes is None:
        raise ValueError("this model's attention needs token codes: call the VisualChat model, not its "
                         "language_model alone")
    group = query.shape[1] // key.shape[1]
    k = key.float().repeat_interleave(group, dim=1)
    v = value.float().repeat_interleave(group, dim=1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = (query.float() @ k.transpose(-1, -2)) * scale
    out, branches = 0.0, 0.0
    for keys in _key_sets(visualchat_codes, query.shape[2]):
        keys = keys[:, None]
        non_empty = keys.any(dim=-1, keepdim=True)
        masked = scores.masked_fill(~keys, float("-inf")).masked_fill(~non_empty, 0.0)
        out = out + torch.softmax(masked, dim=-1).masked_fill(~keys, 0.0) @ v
        branches = branches + non_empty.float()
    if visualchat_codes.combine == "mean" and visualchat_codes.mode == "mmca":
        out = out / branches.clamp(min=1.0)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, mmca_attention)


class Routing:
    """Which of the current hidden states are image tokens ([B, L] bool), set by the model around each forward and
    read by the modality-split layers (a plain object shared by them, not a module)."""

    image: Optional[torch.Tensor] = None


class ModalityLinear(nn.Linear):
    """A bias-free projection with an image-side ``image_weight`` for image tokens."""

    def __init__(self, linear: nn.Linear, routing: Routing):
        super().__init__(linear.in_features, linear.out_features, bias=False, device=linear.weight.device,
                         dtype=linear.weight.dtype)
        self.image_weight = nn.Parameter(torch.empty_like(self.weight))
        self.routing = routing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
        image = self.routing.image
        return out if image is None else torch.where(image[..., None], F.linear(x, self.image_weight), out)


class ModalityRMSNorm(nn.Module):
    """LLaMA's RMSNorm with an image-side scale ``image_weight`` for image tokens (mPLUG-Owl2)."""

    def __init__(self, hidden_size: int, eps: float, routing: Routing):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.image_weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon, self.routing = eps, routing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)).to(x.dtype)
        image = self.routing.image
        scale = self.weight if image is None else torch.where(image[..., None], self.image_weight, self.weight)
        return scale * h


class Mlp(nn.Module):
    def __init__(self, width_in: int, hidden: int, width_out: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width_in, hidden), nn.GELU(), nn.Linear(hidden, width_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class QwenAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, tokens, width = x.shape
        q, k, v = self.qkv(x).reshape(n, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, tokens, width))


class QwenBlock(nn.Module):
    def __init__(self, c: QwenVisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(c.width, eps=c.layer_norm_eps)
        self.norm2 = nn.LayerNorm(c.width, eps=c.layer_norm_eps)
        self.attn, self.mlp = QwenAttention(c.width, c.num_attention_heads), Mlp(c.width, c.intermediate_size, c.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class QwenPatchEmbed(nn.Module):
    def __init__(self, c: QwenVisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, c.width, c.patch_size, stride=c.patch_size, bias=False)


class QwenTrunk(nn.Module):
    def __init__(self, c: QwenVisionConfig):
        super().__init__()
        self.patch_embed = QwenPatchEmbed(c)
        self.pos_embed = nn.Parameter(torch.zeros(1, (c.image_size // c.patch_size) ** 2, c.width))
        self.norm_pre = nn.LayerNorm(c.width, eps=c.layer_norm_eps)
        self.blocks = nn.ModuleList(QwenBlock(c) for _ in range(c.num_hidden_layers))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.norm_pre(self.patch_embed.proj(pixels).flatten(2).transpose(1, 2) + self.pos_embed)
        for block in self.blocks:
            x = block(x)
        return x


class QwenResampler(nn.Module):
    """Learned queries with 2-D sin-cos positions, one cross-attention over the patches; ``key_pos`` is the query
    table resized to the patch grid (stored by the export)."""

    def __init__(self, c: QwenVisionConfig):
        super().__init__()
        patches = (c.image_size // c.patch_size) ** 2
        self.register_buffer("pos_embed", torch.zeros(c.num_queries, c.hidden_size))
        self.register_buffer("key_pos", torch.zeros(patches, c.hidden_size))
        self.query = nn.Parameter(torch.zeros(c.num_queries, c.hidden_size))
        self.kv_proj = nn.Linear(c.width, c.hidden_size, bias=False) if c.width != c.hidden_size else nn.Identity()
        self.attn = nn.MultiheadAttention(c.hidden_size, c.resampler_heads, batch_first=True)
        self.ln_q = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.ln_kv = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        kv = self.ln_kv(self.kv_proj(patches))
        query = (self.ln_q(self.query) + self.pos_embed).unsqueeze(0).expand(kv.shape[0], -1, -1)
        return self.attn(query, kv + self.key_pos, kv, need_weights=False)[0]


class QwenVisionModel(nn.Module):
    """QWen-VL's visual encoder without its final projection: trunk -> resampler -> LayerNorm."""

    def __init__(self, c: QwenVisionConfig):
        super().__init__()
        self.trunk, self.attn_pool = QwenTrunk(c), QwenResampler(c)
        self.ln_post = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    @property
    def dtype(self) -> torch.dtype:
        return self.ln_post.weight.dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.ln_post(self.attn_pool(self.trunk(pixel_values)))


class LinearProjector(nn.Module):
    """Linear + LayerNorm (eps 1e-12), one output per feature (DS-VisualChat's baseline)."""

    def __init__(self, config: VisualChatConfig):
        super().__init__()
        self.proj = nn.Linear(config.vision_config.hidden_size, config.text_config.hidden_size)
        self.norm = nn.LayerNorm(config.text_config.hidden_size, eps=1e-12)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(features))


class MLPProjector(nn.Module):
    """Linear, GELU, Linear (LLaVA-1.5's mlp2x_gelu)."""

    def __init__(self, config: VisualChatConfig):
        super().__init__()
        self.mlp = Mlp(config.vision_config.hidden_size, config.text_config.hidden_size, config.text_config.hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features)


class PoolAdapter(MLPProjector):
    """InfMLLM's pool-adapter: the class token dropped, the square patch grid average-pooled to pool_out x pool_out
    windows, then the MLP."""

    def __init__(self, config: VisualChatConfig):
        super().__init__(config)
        self.pool_out, self.has_cls = config.projector_options["pool_out"], config.projector_options["has_cls"]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.has_cls:
            features = features[:, 1:]
        n, tokens, channels = features.shape
        grid = int(round(tokens ** 0.5))
        image = features.transpose(1, 2).reshape(n, channels, grid, grid)
        window = grid // self.pool_out
        pooled = F.avg_pool2d(image, kernel_size=window, stride=window)
        return self.mlp(pooled.flatten(2).transpose(1, 2))


PROJECTORS = {"linear": LinearProjector, "mlp": MLPProjector, "pool_adapter": PoolAdapter}


class VisualChatForConditionalGeneration(PreTrainedModel, GenerationMixin):
    config_class = VisualChatConfig
    config: VisualChatConfig
    base_model_prefix = ""
    _no_split_modules = ["LlamaDecoderLayer", "CLIPEncoderLayer", "SiglipEncoderLayer", "QwenBlock"]
    _supports_attention_backend = True

    def __init__(self, config: VisualChatConfig):
        super().__init__(config)
        self.routing = Routing()
        vision = config.vision_config  # by model_type: transformers may load the config from another module copy
        self.vision_tower = QwenVisionModel(vision) if vision.model_type == QwenVisionConfig.model_type else \
            AutoModel.from_config(vision)
        self.multi_modal_projector = PROJECTORS[config.projector](config)
        text = config.text_config
        text._attn_implementation = ATTENTION
        self.language_model = LlamaModel(text)
        for layer in self.language_model.layers:
            attention = layer.self_attn
            for name in SPLIT_PROJECTIONS[config.modality_split]:
                setattr(attention, name, ModalityLinear(getattr(attention, name), self.routing))
            if config.modality_norms:
                layer.input_layernorm = ModalityRMSNorm(text.hidden_size, text.rms_norm_eps, self.routing)
                layer.post_attention_layernorm = ModalityRMSNorm(text.hidden_size, text.rms_norm_eps, self.routing)
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixels [N, 3, S, S] -> [N, image_seq_length, hidden] in the LLM's space."""
        layer, pixels = self.config.vision_feature_layer, pixel_values.to(self.vision_tower.dtype)
        if isinstance(self.vision_tower, QwenVisionModel):
            features = self.vision_tower(pixels)
        else:
            out = self.vision_tower(pixel_values=pixels, output_hidden_states=layer is not None)
            features = out.last_hidden_state if layer is None else out.hidden_states[layer]
        if self.config.drop_cls:
            features = features[:, 1:]
        return self.multi_modal_projector(features)

    def forward(self, input_ids: torch.LongTensor, pixel_values: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, position_ids: Optional[torch.LongTensor] = None,
                cache=None, labels: Optional[torch.LongTensor] = None, use_cache: Optional[bool] = None,
                logits_to_keep: int = 0, history_ids: Optional[torch.LongTensor] = None,
                **kwargs) -> CausalLMOutputWithPast:
        """``history_ids`` [B, L_cached + L]: the ids of every position so far when ``cache`` holds earlier ones
        (``generate`` passes them); without it ``input_ids`` must be the whole sequence."""
        cfg = self.config
        history = input_ids if history_ids is None else history_ids
        cached = cache.get_seq_length() if cache is not None else 0
        if cached + input_ids.shape[1] != history.shape[1]:
            raise ValueError(f"the cache holds {cached} positions and input_ids {input_ids.shape[1]}, but the token "
                             f"codes come from {history.shape[1]} ids: pass history_ids with every position's id")
        modality, image_id = token_codes(history, attention_mask, cfg.image_token_index, cfg.image_seq_length)
        embeds = self.language_model.embed_tokens(input_ids)
        positions = input_ids == cfg.image_token_index
        if pixel_values is not None:
            image = self.image_features(pixel_values)
            if int(positions.sum()) != image.shape[0] * image.shape[1]:
                raise ValueError(f"{int(positions.sum())} <image> tokens for {image.shape[0]} images x "
                                 f"{image.shape[1]} tokens: expand each image to image_seq_length tokens")
            embeds = embeds.masked_scatter(positions[..., None], image.reshape(-1, image.shape[-1]).to(embeds.dtype))
        elif bool(positions.any()):
            raise ValueError("<image> tokens in input_ids but no pixel_values")
        routed = cfg.modality_split != "none" or cfg.modality_norms
        self.routing.image = modality[:, -input_ids.shape[1]:] == IMAGE if routed else None
        try:
            out = self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                      cache=cache, use_cache=use_cache,
                                      visualchat_codes=Codes(modality, image_id, cfg.attention_mode, cfg.image_rows,
                                                             cfg.combine), **kwargs)
        finally:
            self.routing.image = None
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=cfg.text_config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache)

    def prepare_inputs_for_generation(self, input_ids, *args, **kwargs):
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        inputs["history_ids"] = input_ids
        return inputs
