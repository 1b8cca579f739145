"""Per-GPU memory of one pipeline stage, in bytes: weights, gradients, optimizer state and activations. The
formulas and their sources are in docs/planner.md; none is yet checked against a GPU's measured peak."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_visualchat.config import LLMConfig
from megatron_visualchat.planner.counts import StageParams, VisionShape

GIB = 2 ** 30
WEIGHT_BYTES = 2  # bf16 model weights (Float16Module casts the whole model, frozen parts included)
MAIN_GRAD_BYTES = 4  # fp32 main gradients of trainable parameters (DDP grad_reduce_in_fp32)
ADAM_BYTES = 12  # fp32 main parameters + Adam's two moments, per trainable parameter


def layer_activation_bytes(s: int, b: int, h: int, a: int, tp: int, recompute: str, sp: bool = False) -> float:
    """Bytes one decoder layer keeps for backward per micro-batch, Korthikanti et al. 2022: with tensor
    parallelism s*b*h*(10 + 24/t + 5*a*s/(h*t)); with sequence parallelism the 10 (norms, residuals, dropout
    masks) is split too: s*b*h*(34/t + 5*a*s/(h*t)). Selective recompute drops the attention-score part
    (5*a*s/(h*t)); full recompute keeps only the layer input (2*s*b*h, a sequence shard 2*s*b*h/t under sp)."""
    shared = 10 / tp if sp else 10  # the part outside the tensor-parallel regions
    per_token = {"none": shared + 24 / tp + 5 * a * s / (h * tp), "selective": shared + 24 / tp,
                 "full": 2 / tp if sp else 2}[recompute]
    return s * b * h * per_token


RECOMPUTE = ("none", "selective", "full")


def in_flight_microbatches(pp: int, vpp: int, stage: int, num_microbatches: int) -> float:
    """Micro-batches whose activations a stage holds at once: PP - stage under 1F1B (at most all of them), times
    1 + (PP-1)/(PP*VPP) on stage 0 with the interleaved schedule (Narayanan et al. 2021)."""
    held = min(pp - stage, num_microbatches)
    if vpp > 1:
        held *= 1 + (pp - 1) / (pp * vpp) if stage == 0 else 1
    return held


@dataclass(frozen=True)
class StageMemory:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    vision_activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.vision_activations


@dataclass(frozen=True)
class Workload:
    """What the memory depends on besides the layout."""

    seq_length: int
    micro_batch_size: int
    images_per_sample: int
    distributed_optimizer: bool
    train_vision_encoder: bool


def stage_memory(llm: LLMConfig, vision: VisionShape, params: StageParams, work: Workload, *, tp: int, pp: int,
                 vpp: int, dp: int, stage: int, layers: int, recompute: str, num_microbatches: int,
                 sp: bool = False) -> StageMemory:
    s, b, h = work.seq_length, work.micro_batch_size, llm.hidden_size
    optimizer = params.trainable * ADAM_BYTES / (dp if work.distributed_optimizer else 1)
    held = in_flight_microbatches(pp, vpp, stage, num_microbatches)
    per_layer = layer_activation_bytes(s, b, h, llm.num_attention_heads, tp, recompute, sp)
    activations = layers * per_layer * held
    if recompute == "full":  # backward recomputes one layer at a time: its whole working set exists once
        activations += layer_activation_bytes(s, b, h, llm.num_attention_heads, tp, "none", sp)
    if stage == pp - 1:  # fp32 logits of the vocabulary shard for the cross-entropy, one micro-batch
        activations += s * b * llm.padded_vocab_size(tp) // tp * 4
    vision_activations = 0.0
    if stage == 0:
        images = b * work.images_per_sample
        v = vision
        if work.train_vision_encoder:  # the trunk's blocks keep activations like a decoder layer at TP 1
            trunk = v.depth * layer_activation_bytes(v.tokens, images, v.width, v.heads, 1, "none")
        else:  # frozen encoder runs under no_grad: only its output features stay (the projector's input)
            trunk = v.features * images * WEIGHT_BYTES
        vision_activations = trunk * held
    return StageMemory(weights=params.total * WEIGHT_BYTES, gradients=params.trainable * MAIN_GRAD_BYTES,
                       optimizer=optimizer, activations=activations, vision_activations=vision_activations)
