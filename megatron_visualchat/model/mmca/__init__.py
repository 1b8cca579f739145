"""Multi-Modal Causal Attention (MMCA): dense reference (oracle, CPU path) and FlexAttention fast path.

Token codes (what each position is) live in ``model/token_codes.py``; the option values in ``config.py``.
"""

from megatron_visualchat.model.mmca.fast import mmca_attention
from megatron_visualchat.model.mmca.reference import mmca_attention_reference

__all__ = ["mmca_attention", "mmca_attention_reference"]
