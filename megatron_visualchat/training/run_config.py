"""The typed run config: every ``pretrain_vchat`` flag, parsed once into sections (torchtitan's job-config shape).

Field names are the Megatron-style flags' argparse names (``--tensor-model-parallel-size`` ->
``parallelism.tensor_model_parallel_size``), so a flag and its field are found by the same word. The training
functions receive a ``TrainingConfig``; checkpoints record it (``meta.json``'s ``run``) so a resume can name what
changed.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from megatron_visualchat.config import LORA_TARGETS, TrainableConfig, dtype_from_flags, dtype_name


@dataclass(frozen=True)
class ParallelismConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    pipeline_layers: Optional[tuple[int, ...]] = None
    sequence_parallel: bool = False
    context_parallel_size: int = 1
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False


@dataclass(frozen=True)
class BatchConfig:
    micro_batch_size: int = 1
    global_batch_size: int = 128
    seq_length: int = 4096
    train_iters: Optional[int] = None
    train_epochs: Optional[float] = None
    seed: int = 1234


@dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 1e-3
    min_lr: float = 0.0
    lr_warmup_fraction: float = 0.1
    lr_decay_style: str = "cosine"
    override_opt_param_scheduler: bool = False
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0


@dataclass(frozen=True)
class PrecisionConfig:
    bf16: bool = False
    fp16: bool = False
    initial_loss_scale: float = 2.0 ** 16

    @property
    def dtype_name(self) -> str:
        return dtype_name(bf16=self.bf16, fp16=self.fp16)

    @property
    def dtype(self):
        return dtype_from_flags(bf16=self.bf16, fp16=self.fp16)


@dataclass(frozen=True)
class RecomputeConfig:
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None

    def transformer_overrides(self) -> dict:
        """The TransformerConfig fields these flags set (none without --recompute-granularity)."""
        return dataclasses.asdict(self) if self.recompute_granularity else {}


@dataclass(frozen=True)
class CheckpointConfig:
    save: Optional[str] = None
    load: Optional[str] = None
    load_iteration: Optional[int] = None
    init_from: tuple[str, ...] = ()
    save_interval: Optional[int] = None
    exit_interval: Optional[int] = None
    keep_last: int = 3
    export_dir: Optional[str] = None
    export_adapters: Optional[str] = None


@dataclass(frozen=True)
class MetricsConfig:
    eval_interval: Optional[int] = None
    eval_iters: int = 4
    eval_accuracy_iters: Optional[int] = None
    log_interval: int = 1
    tensorboard_dir: Optional[str] = None
    no_progress_bar: bool = False


@dataclass(frozen=True)
class ModelConfig:
    model_preset: str = "tiny"
    llm_load: Optional[str] = None
    vision_encoder: str = "tiny"
    vision_weights: Optional[str] = None
    vision_encoder_options: dict = field(default_factory=dict)
    projector_weights: Optional[str] = None
    projector: str = "linear"
    projector_options: dict = field(default_factory=dict)
    attention_mode: str = "mmca"
    modality_split: str = "none"
    image_rows: str = "self"
    combine: str = "sum"
    attention_backend: str = "local"
    modality_norms: bool = False
    cross_attention_interval: int = 1
    trainable: TrainableConfig = TrainableConfig()
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    vision_lora_rank: int = 0
    vision_lora_targets: tuple[str, ...] = LORA_TARGETS


@dataclass(frozen=True)
class DataConfig:
    data: tuple[str, ...] = ()
    eval_data: tuple[str, ...] = ()
    data_total_samples: Optional[int] = None
    synthetic: Optional[int] = None
    data_cache_dir: str = "runs/data"
    tokenizer_dir: Optional[str] = None
    template: str = "dsvc"
    max_images: int = 8
    num_workers: int = 0
    pack: bool = False
    strict_data: bool = False
    box_outside: str = "clip"  # grounding boxes the image crop cuts: clip them, or skip the record (data/boxes.py)
    image_tokenizer: Optional[str] = None  # NAME:DIR: answers write images as its codes (docs/image_generation.md)
    image_code_cache_dir: Optional[str] = None  # default: <data_cache_dir>/image_codes
    text_loss_weight: float = 1.0  # per-target loss weights (text vs image-code targets), a weighted mean
    image_code_loss_weight: float = 1.0


@dataclass(frozen=True)
class TrainingConfig:
    parallelism: ParallelismConfig = ParallelismConfig()
    batch: BatchConfig = BatchConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    precision: PrecisionConfig = PrecisionConfig()
    recompute: RecomputeConfig = RecomputeConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    metrics: MetricsConfig = MetricsConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    dry_run: bool = False

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> "TrainingConfig":
        """Route each parsed flag to its section's field. A flag without a field (or a field without a flag) is a
        programming error caught here, so the parser and the config cannot drift apart."""
        values = dict(vars(ns))
        sections = {}
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.default):
                names = [sf.name for sf in dataclasses.fields(f.default)]
                sections[f.name] = type(f.default)(**{n: _freeze(values.pop(n)) for n in names})
            else:
                sections[f.name] = values.pop(f.name)
        if values:
            raise TypeError(f"flags without a TrainingConfig field: {sorted(values)}")
        return cls(**sections)

    def to_dict(self) -> dict:
        """JSON-ready record (``meta.json``'s ``run``)."""
        return _jsonable(dataclasses.asdict(self))


def _freeze(value):
    return tuple(value) if isinstance(value, list) else value


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
