"""RMSNorm that stays in the activation dtype.

megatron-core's local spec wraps ``torch.nn.RMSNorm`` whose weight stays float32 under bf16 activations, so its
output is promoted to float32 and every following GEMM pays for it (measured 3.7x slower than HF transformers on a
7B step together with the dense core attention). This norm does its statistics in float32 (``F.rms_norm``
accumulates in float32) but keeps the weight and the output in the input's dtype, as HF LLaMA does.
State-dict keys are those of megatron's norm (``weight``), so checkpoints are interchangeable.

Under sequence parallelism each TP rank normalises its own sequence shard (the norm is per token, no
communication), so a weight's gradient covers only that shard's tokens: like megatron's norms, the weights are
flagged ``sequence_parallel`` and megatron-core's ``finalize_model_grads`` sums their gradients over the TP group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class RMSNorm(torch.nn.Module):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.hidden_size, self.eps = hidden_size, eps
        self.sequence_parallel = config.sequence_parallel
        self.weight = self._replicated(torch.ones(hidden_size, dtype=config.params_dtype))

    def _replicated(self, value: torch.Tensor) -> torch.nn.Parameter:
        param = torch.nn.Parameter(value)
        param.sequence_parallel = self.sequence_parallel  # read by finalize_model_grads
        return param

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (self.hidden_size,), self.weight.to(x.dtype), self.eps)


class ModalityRMSNorm(RMSNorm):
    """mPLUG-Owl2's modality-adaptive norm: image tokens are scaled by their own (trainable) ``image_weight``,
    text tokens by the LLM's ``weight``. The owning layer sets ``routing`` (``token_codes.ImageRouting``) around
    its forward (under sequence parallelism, for this rank's sequence shard); without image tokens the image weight
    still gets a defined zero gradient (DDP buckets never stall)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5):
        super().__init__(config, hidden_size, eps)
        self.image_weight = self._replicated(self.weight.detach().clone())
        self.routing = None

    def copy_text_weight_to_image(self) -> None:
        with torch.no_grad():
            self.image_weight.copy_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.routing is None or not self.routing.any_image:
            return super().forward(x) + 0.0 * self.image_weight.sum().to(x.dtype)
        normed = F.rms_norm(x, (self.hidden_size,), None, self.eps)
        mask = self.routing.mask[..., None]
        scale = torch.where(mask, self.image_weight.to(x.dtype), self.weight.to(x.dtype))
        return normed * scale
