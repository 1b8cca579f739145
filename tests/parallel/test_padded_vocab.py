"""Megatron's vocabulary padding is no token: padded output columns never win the argmax (answer accuracy,
greedy decoding) and are -inf in the logits the model returns, sliced per TP rank or gathered. The loss being the
same whatever padding a TP size brings is tests/parallel/test_optimizer_step_parity.py's."""

import dataclasses

import pytest
import torch

from megatron_visualchat.config import LLM_PRESETS, VisualChatConfig
from megatron_visualchat.testing.distributed import run_parallel
from megatron_visualchat.testing.equivalence import current_parallel

LLM = dataclasses.replace(LLM_PRESETS["tiny"], vocab_size=402)  # padded: 408 at TP=1, 416 at TP=2


def _argmax_with_loud_padding():
    """Padded output rows set to +-100 u: without the mask a padded column beats every real one."""
    from megatron.core import parallel_state as ps

    from megatron_visualchat.model.gpt import build_gpt_model
    from megatron_visualchat.training.accuracy import vocab_parallel_argmax

    torch.manual_seed(0)
    model = build_gpt_model(VisualChatConfig(llm=LLM, parallel=current_parallel()))
    weight = model.output_layer.weight
    start = ps.get_tensor_model_parallel_rank() * weight.shape[0]
    u = torch.randn(weight.shape[1], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for row in range(max(LLM.vocab_size - start, 0), weight.shape[0]):
            weight[row] = 100.0 * u * (-1) ** row
    tokens = torch.randint(0, LLM.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    position_ids = torch.arange(12).expand(2, 12)
    local = model(tokens, position_ids, None)
    gathered = model(tokens, position_ids, None, runtime_gather_output=True)
    return vocab_parallel_argmax(local), gathered


@pytest.mark.parametrize("tp", [1, 2])
def test_padded_columns_never_win_and_are_minus_infinity(tp):
    ids, gathered = run_parallel(_argmax_with_loud_padding, tp=tp)[0]
    assert gathered.shape[-1] == LLM.padded_vocab_size(tp)
    assert int(ids.max()) < LLM.vocab_size
    torch.testing.assert_close(ids, gathered.argmax(dim=-1), rtol=0, atol=0)
    assert torch.isneginf(gathered[..., LLM.vocab_size:]).all()
    assert torch.isfinite(gathered[..., :LLM.vocab_size]).all()
