import torch

from megatron_visualchat.config import LLM_PRESETS, VisualChatConfig, to_transformer_config
from megatron_visualchat.model.norms import RMSNorm


def _config(dtype):
    return to_transformer_config(VisualChatConfig(llm=LLM_PRESETS["tiny"]), dtype)


def test_matches_torch_rmsnorm_in_fp32():
    norm = RMSNorm(_config(torch.float32), 64, eps=1e-5)
    torch.nn.init.normal_(norm.weight)
    ref = torch.nn.RMSNorm(64, eps=1e-5)
    ref.weight.data.copy_(norm.weight)
    x = torch.randn(5, 3, 64) * 10
    torch.testing.assert_close(norm(x), ref(x))


def test_stays_in_the_activation_dtype():
    norm = RMSNorm(_config(torch.bfloat16), 64).bfloat16()
    x = torch.randn(5, 3, 64, dtype=torch.bfloat16) * 100
    y = norm(x)
    assert y.dtype == torch.bfloat16 and norm.weight.dtype == torch.bfloat16
    ref = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)
