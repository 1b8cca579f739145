"""Configuration of a megatron_visualchat chat model exported for ``trust_remote_code=True`` (``export-hf``).

Written by megatron_visualchat; depends only on transformers. ``text_config`` is a LlamaConfig, ``vision_config``
a CLIP or SigLIP vision config, or a ``QwenVisionConfig``; the other fields say how they meet (modeling_visualchat.py).
"""

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

CHOICES = {"attention_mode": ("mmca", "causal"), "image_rows": ("self", "self+text", "image"),
           "combine": ("sum", "mean"), "modality_split": ("none", "kv", "qkv", "qkvo"),
           "projector": ("linear", "mlp", "pool_adapter")}


class QwenVisionConfig(PreTrainedConfig):
    """QWen-VL's visual encoder (transformers has none): a ViT trunk of ``width`` (pre-norm, no class token, no
    final norm), a resampler of ``num_queries`` queries at ``hidden_size``, then a final LayerNorm."""

    model_type = "megatron_visualchat_qwen_vision"

    image_size: int = 448
    patch_size: int = 14
    width: int = 1664
    num_hidden_layers: int = 48
    num_attention_heads: int = 16
    intermediate_size: int = 8192
    hidden_size: int = 4096
    num_queries: int = 256
    resampler_heads: int = 32
    layer_norm_eps: float = 1e-6


AutoConfig.register(QwenVisionConfig.model_type, QwenVisionConfig, exist_ok=True)


class VisualChatConfig(PreTrainedConfig):
    """``attention_mode`` / ``image_rows`` / ``combine``: MMCA's key sets (docs/design/mmca.md of
    megatron_visualchat); ``modality_split``: the attention projections with image-side weights;
    ``modality_norms``: image-side norm weights (mPLUG-Owl2); ``projector`` (+ ``projector_options``) maps vision
    features to the LLM; ``vision_feature_layer`` (None: the tower's last_hidden_state) and ``drop_cls`` pick the
    features; each image is ``image_seq_length`` ``image_token_index`` tokens of the prompt."""

    model_type = "megatron_visualchat"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model"),
    }

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    attention_mode: str = "mmca"
    image_rows: str = "self"
    combine: str = "sum"
    modality_split: str = "none"
    modality_norms: bool = False
    projector: str = "mlp"
    projector_options: dict | None = None
    vision_feature_layer: int | None = None
    drop_cls: bool = False
    image_token_index: int = 0
    image_seq_length: int = 1
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {allowed}")
        self.projector_options = dict(self.projector_options or {})
