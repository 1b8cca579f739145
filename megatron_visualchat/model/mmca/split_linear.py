"""Modality-split projections: image tokens go through their own (trainable) weights, text tokens through the
frozen LLM's. Each token is multiplied once, by exactly one of the two weights (no doubled matmul work).

The text weight stays the layer's ``weight`` so state-dict keys equal megatron-core's stock spec (a converted
LLaMA checkpoint loads unchanged); the image side is the extra parameter ``image_weight``. The owning attention
sets ``routing`` (``token_codes.ImageRouting``, computed once per forward) before each forward; ``None`` or no image
token runs the text path and adds ``0 * image_weight.sum()`` so the image side still gets a defined zero gradient
(DDP buckets never stall).

``image_weight`` carries megatron's tensor-parallel attributes like ``weight`` (split along the same dim): the
gradient norm (clipping, logging) counts a TP-split parameter on every TP rank and a replicated one on rank 0 only.

Sequence parallelism: like megatron's own linears, the column-parallel input arrives sequence-sharded and is
all-gathered (backward: reduce-scatter) before the routed matmul, and the row-parallel partial output is
reduce-scattered to sequence shards instead of all-reduced. Both matmuls run over the full sequence, so
``routing`` always covers all ``s`` positions; the row linear also gets ``out_routing``, its output's sequence
shard (what LoRA's row-side adapter, which works on that shard, needs).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    set_tensor_model_parallel_attributes,
)
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)

from megatron_visualchat.model.token_codes import ImageRouting


def _check_supported(layer) -> None:
    if layer.bias is not None:
        raise ValueError("modality_split needs bias-free linears (LLaMA: add_bias_linear=False)")


def _routed_matmul(x: torch.Tensor, routing: ImageRouting, text_weight: torch.Tensor,
                   image_weight: torch.Tensor) -> torch.Tensor:
    """y[t] = x[t] @ W_text^T for text tokens, x[t] @ W_image^T for image tokens; x [s, b, in]."""
    s, b, _ = x.shape
    flat, img_idx, txt_idx = x.reshape(s * b, -1), routing.image_idx, routing.text_idx
    y = flat.new_zeros(s * b, text_weight.shape[0])
    y = y.index_copy(0, txt_idx, F.linear(flat[txt_idx], text_weight))
    y = y.index_copy(0, img_idx, F.linear(flat[img_idx], image_weight))
    return y.view(s, b, -1)


class ModalitySplitColumnParallelLinear(ColumnParallelLinear):
    """``linear_qkv`` with an image-side Q/K/V (split="qkv") or K/V (split="kv") weight, TP-sharded like the text
    weight (whole query groups per rank)."""

    def __init__(self, input_size: int, output_size: int, *, config, split: str = "qkv", **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        _check_supported(self)
        self.split = split
        tp = self.tp_group.size()
        self.groups = config.num_query_groups // tp
        self.heads_per_group = config.num_attention_heads // config.num_query_groups
        self.head_dim = config.kv_channels
        self.image_weight = torch.nn.Parameter(self._text_rows_for_image().detach().clone())
        set_tensor_model_parallel_attributes(self.image_weight, is_parallel=True, dim=0, stride=1)
        self.routing: Optional[ImageRouting] = None

    def _per_group(self, w: torch.Tensor) -> torch.Tensor:
        return w.view(self.groups, self.heads_per_group + 2, self.head_dim, -1)

    def _text_rows_for_image(self) -> torch.Tensor:
        if self.split == "qkv":
            return self.weight
        return self._per_group(self.weight)[:, self.heads_per_group:].reshape(-1, self.weight.shape[1])

    def copy_text_weight_to_image(self) -> None:
        """Image-side weights start as copies of the (loaded) text weights."""
        with torch.no_grad():
            self.image_weight.copy_(self._text_rows_for_image())

    def image_full_weight(self) -> torch.Tensor:
        if self.split == "qkv":
            return self.image_weight
        q_rows = self._per_group(self.weight)[:, : self.heads_per_group]
        kv_rows = self.image_weight.view(self.groups, 2, self.head_dim, -1)
        return torch.cat([q_rows, kv_rows], dim=1).reshape(self.weight.shape)

    def forward(self, input_: torch.Tensor, weight=None, runtime_gather_output=None):
        if self.routing is None or not self.routing.any_image:
            out, bias = super().forward(input_)
            return out + 0.0 * self.image_weight.sum(), bias
        if self.sequence_parallel:  # [s/tp, b, h] -> [s, b, h]; backward reduce-scatters the input gradient
            x = gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=True, group=self.tp_group)
        else:
            x = copy_to_tensor_model_parallel_region(input_, group=self.tp_group)
        return _routed_matmul(x, self.routing, self.weight, self.image_full_weight()), None


class ModalitySplitRowParallelLinear(RowParallelLinear):
    """``linear_proj`` with an image-side output projection (modality_split="qkvo")."""

    def __init__(self, input_size: int, output_size: int, *, config, **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        _check_supported(self)
        self.image_weight = torch.nn.Parameter(self.weight.detach().clone())
        set_tensor_model_parallel_attributes(self.image_weight, is_parallel=True, dim=1, stride=1)
        self.routing: Optional[ImageRouting] = None
        self.out_routing: Optional[ImageRouting] = None

    def copy_text_weight_to_image(self) -> None:
        with torch.no_grad():
            self.image_weight.copy_(self.weight)

    def forward(self, input_: torch.Tensor):
        if self.routing is None or not self.routing.any_image:
            out, bias = super().forward(input_)
            return out + 0.0 * self.image_weight.sum(), bias
        partial = _routed_matmul(input_, self.routing, self.weight, self.image_weight)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(partial, group=self.tp_group), None
        return reduce_from_tensor_model_parallel_region(partial, group=self.tp_group), None


def copy_text_weights_to_image(model: torch.nn.Module) -> int:
    """After loading a text-only LLM checkpoint: initialise every image-side weight from its text weight.
    Returns how many layers were initialised."""
    n = 0
    for module in model.modules():
        if hasattr(module, "copy_text_weight_to_image"):  # split projections and modality norms
            module.copy_text_weight_to_image()
            n += 1
    return n
