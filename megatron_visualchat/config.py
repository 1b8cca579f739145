"""One validated config tree: LLM preset, vision, attention, parallel layout, trainable parts.

Everything is checked up front (``VisualChatConfig.validate``) so that a wrong TP/PP size or option fails in the
first second with the numbers in the message, not an hour into a 70B job.

This module is also the one home of the option names (``ATTENTION_MODES`` ... ``BACKENDS``, ``DTYPES``), of the
check that a value is one of them (``check_choice``) and of the split of a world of processes into TP x PP x DP
(``ParallelConfig.for_world``); other modules import them from here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

import torch


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the value and what would be valid."""


def check_choice(name: str, value, allowed) -> None:
    """Refuse ``value`` unless it is in ``allowed``: ``ConfigError("name='x' is not one of [...]")``."""
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {sorted(allowed)}")


# Precision names as the command lines spell them (--dtype, checkpoint records).
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_name(*, bf16: bool = False, fp16: bool = False) -> str:
    """The ``DTYPES`` name for megatron-style ``--bf16`` / ``--fp16`` flags (neither: fp32; bf16 wins over fp16)."""
    return "bf16" if bf16 else "fp16" if fp16 else "fp32"


def dtype_from_flags(*, bf16: bool = False, fp16: bool = False) -> torch.dtype:
    """The parameter dtype for ``--bf16`` / ``--fp16`` flags (see ``dtype_name``)."""
    return DTYPES[dtype_name(bf16=bf16, fp16=fp16)]


@dataclass(frozen=True)
class LLMConfig:
    """A LLaMA-architecture decoder (RMSNorm, SwiGLU, RoPE, no biases, untied embeddings, optional GQA)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    num_query_groups: Optional[int] = None  # None: multi-head attention (= num_attention_heads)
    vocab_size: int = 32000
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_base: float = 10000.0
    make_vocab_size_divisible_by: int = 128
    untie_embeddings: bool = True

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tp: int) -> int:
        """Megatron pads the vocabulary to a multiple of ``make_vocab_size_divisible_by * TP``."""
        multiple = self.make_vocab_size_divisible_by * tp
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def validate(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be positive")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}"
            )
        if self.num_attention_heads % self.query_groups:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_query_groups={self.query_groups}"
            )


LLM_PRESETS: dict[str, LLMConfig] = {
    "tiny": LLMConfig(
        num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
        vocab_size=256, max_position_embeddings=512, make_vocab_size_divisible_by=8,
    ),
    "llama2-7b": LLMConfig(num_layers=32, hidden_size=4096, num_attention_heads=32, ffn_hidden_size=11008),
    "llama2-13b": LLMConfig(num_layers=40, hidden_size=5120, num_attention_heads=40, ffn_hidden_size=13824),
    "llama2-70b": LLMConfig(
        num_layers=80, hidden_size=8192, num_attention_heads=64, num_query_groups=8, ffn_hidden_size=28672
    ),
}

LLM_FROM_CHECKPOINT = "from-llm-load"  # --model-preset: the architecture recorded in the converted --llm-load

ATTENTION_MODES = ("mmca", "causal", "cross")
CORE_ATTENTION_MODES = ("mmca", "causal")  # of MMCA's core attention; mode "cross" self-attends causally
MODALITY_SPLITS = ("none", "kv", "qkv", "qkvo")
IMAGE_ROWS = ("self", "self+text", "image")
COMBINES = ("sum", "mean")
BACKENDS = ("local", "te")


@dataclass(frozen=True)
class AttentionConfig:
    """How text and image tokens attend (see docs/design/mmca.md). ``validate`` is the one check of these options
    and of their combinations; ``model/layer_specs.py`` builds from a validated one without checking again."""

    mode: str = "mmca"
    modality_split: str = "none"
    image_rows: str = "self"
    combine: str = "sum"
    backend: str = "local"
    modality_norms: bool = False  # mPLUG-Owl2: per-modality input / pre-MLP norms
    cross_attention_interval: int = 1  # mode "cross": a gated cross-attention layer every K decoder layers

    def validate(self) -> None:
        check_choice("attention.mode", self.mode, ATTENTION_MODES)
        if self.cross_attention_interval < 1:
            raise ConfigError(f"attention.cross_attention_interval={self.cross_attention_interval} must be >= 1")
        if self.mode == "cross":
            self._validate_cross()
        elif self.cross_attention_interval != 1:
            raise ConfigError(f"attention.cross_attention_interval={self.cross_attention_interval} applies to "
                              f"mode='cross' only (mode is {self.mode!r})")
        check_choice("attention.modality_split", self.modality_split, MODALITY_SPLITS)
        check_choice("attention.image_rows", self.image_rows, IMAGE_ROWS)
        check_choice("attention.combine", self.combine, COMBINES)
        check_choice("attention.backend", self.backend, BACKENDS)
        if self.backend == "te" and self.modality_split != "none":
            raise ConfigError(f"attention.modality_split={self.modality_split!r} needs backend='local': "
                              "Transformer-Engine fuses the input norm into linear_qkv, which the split projection "
                              "replaces")
        if self.backend == "te" and self.modality_norms:
            raise ConfigError("attention.modality_norms needs backend='local': Transformer-Engine fuses the norms "
                              "into the linears")

    def _validate_cross(self) -> None:
        """Cross mode (docs/design/cross_attention.md) keeps images out of the sequence: the options that act on
        image positions of the sequence have nothing to act on."""
        defaults = AttentionConfig()
        for name in ("modality_split", "image_rows", "combine", "modality_norms"):
            if getattr(self, name) != getattr(defaults, name):
                raise ConfigError(f"attention.{name}={getattr(self, name)!r} does not apply to mode='cross' (images "
                                  f"reach the LLM through cross-attention only); drop it or pick mode 'mmca'")
        if self.backend != "local":
            raise ConfigError("attention.mode='cross' needs backend='local' (the gated cross-attention layers are "
                              "built from megatron-core's local linears)")


# Linears LoRA can adapt: in a decoder layer linear_qkv, linear_proj, linear_fc1, linear_fc2; in a vision encoder's
# (timm) blocks attn.qkv, attn.proj, mlp.fc1, mlp.fc2.
LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")
# State-dict names of an adapter pair beside the weight it adapts: (weight, A, B), for a linear's weight and for the
# image_weight of a modality-split one (model/lora.py builds them, checkpoint/adapters.py stores them).
LORA_PAIRS = (("weight", "lora_a", "lora_b"), ("image_weight", "image_lora_a", "image_lora_b"))


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters (LoRA): a target linear computes ``W x + (alpha / rank) * B A dropout(x)`` with B zero at
    the start, so step 0 is the base model. ``rank`` 0: no adapters on the decoder; ``vision_rank`` 0: none on the
    vision encoder (``alpha`` is shared; ``dropout`` applies to the decoder's adapters, a frozen encoder runs in
    eval mode). Adapters always train; what they adapt stays as ``TrainableConfig`` says (docs/lora.md)."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_TARGETS
    vision_rank: int = 0
    vision_targets: tuple[str, ...] = LORA_TARGETS

    @property
    def enabled(self) -> bool:
        return self.rank > 0 or self.vision_rank > 0

    def validate(self, attention: AttentionConfig) -> None:
        for prefix, rank, targets in (("lora.", self.rank, self.targets),
                                      ("lora.vision_", self.vision_rank, self.vision_targets)):
            if rank < 0:
                raise ConfigError(f"{prefix}rank={rank} must be >= 0 (0: no adapters)")
            if rank and not targets:
                raise ConfigError(f"{prefix}rank={rank} needs {prefix}targets, some of {list(LORA_TARGETS)}")
            for target in targets:
                check_choice(f"{prefix}targets entry", target, LORA_TARGETS)
            if len(set(targets)) != len(targets):
                raise ConfigError(f"{prefix}targets={list(targets)} names a linear twice")
        if self.enabled and not self.alpha > 0:
            raise ConfigError(f"lora.alpha={self.alpha} must be > 0 with adapters (the scale is alpha / rank)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout={self.dropout} must be in [0, 1)")
        if self.rank and attention.backend == "te":
            raise ConfigError("LoRA on the decoder needs attention.backend='local': the adapters wrap megatron-core's "
                              "local ColumnParallelLinear / RowParallelLinear, not Transformer-Engine's fused linears")


@dataclass(frozen=True)
class VisionConfig:
    encoder: str = "tiny"
    projector: str = "linear"
    projector_options: dict = field(default_factory=dict)
    freeze_encoder: bool = True
    encoder_weights: Optional[str] = None
    encoder_options: dict = field(default_factory=dict)  # model/vision EncoderOptions: feature_layer, drop_cls, resize
    projector_weights: Optional[str] = None  # a projector's own state dict (safetensors), e.g. from import-hf


@dataclass(frozen=True)
class TrainableConfig:
    """What training changes. DS-VisualChat trains the projector and a copy of the input embeddings (its MMCA adds
    no attention weights); ``image_projections`` are the image-side weights of ``--modality-split`` and
    ``--modality-norms`` (this project's and mPLUG-Owl2's additions). The LLM's text weights and the vision encoder
    stay frozen."""

    projector: bool = True
    image_projections: bool = True  # image-side weights: modality-split linears, modality norms (Owl2)
    embeddings: bool = False  # a trainable copy of the input embeddings (DS-VisualChat fidelity: True)
    new_token_rows_only: bool = False  # train only the rows of added special tokens (e.g. <image>, pad)
    llm: bool = False
    vision_encoder: bool = False

    def validate(self) -> None:
        if self.embeddings and self.new_token_rows_only:
            raise ConfigError("trainable.embeddings and trainable.new_token_rows_only are exclusive: pick one")


@dataclass(frozen=True)
class ParallelConfig:
    """Process layout. ``pp_layers`` is an explicit per-stage layer split (e.g. a lighter first stage, which also
    carries the vision encoder); ``vpp`` is megatron's virtual (interleaved) pipeline size; ``sequence_parallel``
    shards the activations outside the tensor-parallel regions (norms, residuals) along the sequence over the TP
    ranks (megatron-core's sequence parallelism, Korthikanti et al. 2022)."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    vpp: Optional[int] = None
    pp_layers: Optional[tuple[int, ...]] = None
    sequence_parallel: bool = False
    cp: int = 1  # context parallelism: each rank holds 2 of 2*cp sequence chunks (model/mmca/context_parallel.py)

    @classmethod
    def for_world(cls, world_size: int, *, tp: int = 1, pp: int = 1, vpp: Optional[int] = None,
                  pp_layers: Optional[tuple[int, ...]] = None, sequence_parallel: bool = False,
                  cp: int = 1) -> "ParallelConfig":
        """The layout of ``world_size`` processes into tp x pp x cp model-parallel groups; data parallelism takes
        the rest (dp = world_size / (tp x pp x cp)). Refuses a world size that is not a multiple of tp x pp x cp."""
        for name, value in (("tp", tp), ("pp", pp), ("cp", cp)):
            if value < 1:
                raise ConfigError(f"parallel.{name}={value} must be >= 1")
        if world_size < 1:
            raise ConfigError(f"world size {world_size} must be >= 1")
        if world_size % (tp * pp * cp):
            with_cp = f" x cp({cp})" if cp > 1 else ""
            raise ConfigError(f"world size {world_size} is not divisible by tp({tp}) x pp({pp}){with_cp}: launch a "
                              f"multiple of {tp * pp * cp} processes")
        return cls(tp=tp, pp=pp, dp=world_size // (tp * pp * cp), vpp=vpp, pp_layers=pp_layers,
                   sequence_parallel=sequence_parallel, cp=cp)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    def check_world_size(self, world_size: int) -> None:
        """Refuse a number of processes other than tp x pp x cp x dp."""
        if world_size != self.world_size:
            with_cp = f" x cp({self.cp})" if self.cp > 1 else ""
            raise ConfigError(f"world size {world_size} != tp({self.tp}) x pp({self.pp}){with_cp} x dp({self.dp}) = "
                              f"{self.world_size}")

    def validate(self, llm: LLMConfig, world_size: Optional[int] = None) -> None:
        for name in ("tp", "pp", "cp", "dp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name}={getattr(self, name)} must be >= 1")
        if llm.num_attention_heads % self.tp:
            raise ConfigError(
                f"tensor parallel size {self.tp} does not divide num_attention_heads={llm.num_attention_heads}"
            )
        if llm.query_groups % self.tp:
            raise ConfigError(
                f"tensor parallel size {self.tp} does not divide num_query_groups={llm.query_groups}"
            )
        if llm.ffn_hidden_size % self.tp:
            raise ConfigError(f"tensor parallel size {self.tp} does not divide ffn_hidden_size={llm.ffn_hidden_size}")
        # The padded vocabulary is a multiple of make_vocab_size_divisible_by x TP, so TP always divides it.
        if self.pp_layers is not None:
            if self.vpp is not None:
                raise ConfigError("parallel.pp_layers and parallel.vpp cannot be combined")
            if len(self.pp_layers) != self.pp:
                raise ConfigError(f"parallel.pp_layers={list(self.pp_layers)} has {len(self.pp_layers)} entries, "
                                  f"expected one per pipeline stage (pp={self.pp})")
            if any(n < 0 for n in self.pp_layers) or sum(self.pp_layers) != llm.num_layers:
                raise ConfigError(f"parallel.pp_layers={list(self.pp_layers)} sums to {sum(self.pp_layers)}, "
                                  f"but the model has num_layers={llm.num_layers}")
        else:
            chunks = self.pp * (self.vpp or 1)
            if llm.num_layers % chunks:
                what = f"pp={self.pp}" + (f" x vpp={self.vpp}" if self.vpp else "")
                raise ConfigError(f"pipeline size {what} does not divide num_layers={llm.num_layers}")
        if self.vpp is not None and (self.vpp < 2 or self.pp < 2):
            raise ConfigError(f"parallel.vpp={self.vpp} needs vpp >= 2 and pp >= 2 (pp={self.pp})")
        if self.sequence_parallel and self.tp < 2:
            raise ConfigError("parallel.sequence_parallel shards the sequence over the tensor-parallel ranks: it "
                              f"needs tp >= 2 (tp={self.tp}); drop --sequence-parallel or raise the TP size")
        if world_size is not None:
            self.check_world_size(world_size)


MODEL_KINDS = ("visualchat", "jam-cross")
JAM_CROSS = "jam-cross"


@dataclass(frozen=True)
class FusionConfig:
    """Which model is built: ``visualchat`` (one decoder, the vision tower in front) or ``jam-cross`` (JAM-Cross,
    docs/fusion.md: two text-only towers of one architecture, gated cross-attention between them after every
    ``cross_interval``-th layer, one joint head; ``model/jam_cross.py``). A ``fuse --method cross`` checkpoint
    records it; ``--model-preset from-llm-load`` reads it from there."""

    kind: str = "visualchat"
    cross_interval: int = 1

    def validate(self) -> None:
        check_choice("fusion.kind", self.kind, MODEL_KINDS)
        if self.cross_interval < 1:
            raise ConfigError(f"fusion.cross_interval={self.cross_interval} must be >= 1")


@dataclass(frozen=True)
class VisualChatConfig:
    llm: LLMConfig = LLM_PRESETS["tiny"]
    attention: AttentionConfig = AttentionConfig()
    vision: VisionConfig = VisionConfig()
    trainable: TrainableConfig = TrainableConfig()
    parallel: ParallelConfig = ParallelConfig()
    lora: LoraConfig = LoraConfig()
    fusion: FusionConfig = FusionConfig()

    @classmethod
    def from_preset(cls, preset: str, **overrides) -> "VisualChatConfig":
        check_choice("preset", preset, LLM_PRESETS)
        return cls(llm=LLM_PRESETS[preset], **overrides)

    def replace(self, **changes) -> "VisualChatConfig":
        return dataclasses.replace(self, **changes)

    def validate(self, world_size: Optional[int] = None) -> "VisualChatConfig":
        self.llm.validate()
        self.attention.validate()
        self.trainable.validate()
        self.lora.validate(self.attention)
        self.parallel.validate(self.llm, world_size)
        if self.parallel.sequence_parallel and self.attention.mode == "cross":
            raise ConfigError("parallel.sequence_parallel is not supported with attention.mode='cross' (its "
                              "image context is not a sequence shard); drop --sequence-parallel or use mode 'mmca'")
        if self.parallel.cp > 1 and self.attention.mode == "cross":
            raise ConfigError("parallel.cp > 1 (context parallelism) is implemented in the MMCA core attention, not "
                              "in the cross-attention layers of mode 'cross'; use mode 'mmca' or 'causal', or cp=1")
        if self.attention.mode == "cross" and self.attention.cross_attention_interval > self.llm.num_layers:
            raise ConfigError(f"attention.cross_attention_interval={self.attention.cross_attention_interval} exceeds "
                              f"num_layers={self.llm.num_layers}: no layer would get cross-attention, so no image "
                              "would reach the model")
        self.fusion.validate()
        if self.fusion.kind == JAM_CROSS:
            self._validate_jam_cross()
        return self

    def _validate_jam_cross(self) -> None:
        """JAM-Cross is two text towers: what acts on images, and the layouts its forward does not implement yet,
        are refused by name."""
        unsupported = {
            "a vision encoder or projector (--vision-*, --projector*): the fused model reads text and image codes "
            "only": self.vision != VisionConfig(),
            "--trainable vision_encoder / new_token_rows_only": self.trainable.vision_encoder
            or self.trainable.new_token_rows_only,
            "image-side attention options (--attention-mode cross, --modality-split, --modality-norms, "
            "--image-rows, --combine, --attention-backend te)": self.attention.mode == "cross"
            or dataclasses.replace(self.attention, mode="mmca") != AttentionConfig(),
            "LoRA (--lora-rank, --vision-lora-rank)": self.lora.enabled,
            "--sequence-parallel, --context-parallel-size > 1, --virtual-pipeline-model-parallel-size":
                self.parallel.sequence_parallel or self.parallel.cp > 1 or self.parallel.vpp is not None,
            "tied embeddings (the joint head starts from tower A's own output layer)": not self.llm.untie_embeddings,
        }
        wrong = [what for what, bad in unsupported.items() if bad]
        if wrong:
            raise ConfigError("fusion.kind='jam-cross' (a fuse --method cross checkpoint) does not support: "
                              + "; ".join(wrong))
        if self.fusion.cross_interval > self.llm.num_layers:
            raise ConfigError(f"fusion.cross_interval={self.fusion.cross_interval} exceeds num_layers="
                              f"{self.llm.num_layers}: the towers would never exchange anything")


def pipeline_layout(parallel: ParallelConfig) -> Optional[list[list[str]]]:
    """An explicit split as megatron-core's ``pipeline_model_parallel_layout`` (embedding on the first stage,
    loss on the last)."""
    if parallel.pp_layers is None:
        return None
    stages = [["decoder"] * n for n in parallel.pp_layers]
    stages[0].insert(0, "embedding")
    stages[-1].append("loss")
    return stages


def to_transformer_config(cfg: VisualChatConfig, params_dtype: torch.dtype = torch.float32, **extra):
    """Map to megatron-core's ``TransformerConfig``. It must carry the real TP and PP sizes: megatron-core derives
    the number of layers each stage builds from them (without PP every stage silently builds all layers)."""
    # Imported here, not at the top: the checkpoint converter and the inference package import this module and
    # start without megatron-core (`megatron-visualchat chat --help` stays quick).
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg.validate()
    llm, par = cfg.llm, cfg.parallel
    kwargs = dict(
        num_layers=llm.num_layers,
        hidden_size=llm.hidden_size,
        num_attention_heads=llm.num_attention_heads,
        num_query_groups=llm.query_groups,
        ffn_hidden_size=llm.ffn_hidden_size,
        kv_channels=llm.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=llm.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        rotary_interleaved=False,
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        virtual_pipeline_model_parallel_size=par.vpp,
        pipeline_model_parallel_layout=pipeline_layout(par),
        sequence_parallel=par.sequence_parallel,
        context_parallel_size=par.cp,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=not torch.cuda.is_available(),
        transformer_impl="transformer_engine" if cfg.attention.backend == "te" else "local",
        attention_softmax_in_fp32=True,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
    )
    kwargs.update(extra)
    return TransformerConfig(**kwargs)
