"""KVCache keeps the codes of cached positions next to megatron-core's K/V, commits only after a forward,
rolls back by moving the offset, and refuses what does not fit."""

import pytest
import torch

from megatron_visualchat.inference.kv_cache import ContextFullError, KVCache
from megatron_visualchat.model.token_codes import unpack_token_codes


def test_codes_of_cached_and_new_positions_travel_together():
    cache = KVCache(2, 10)
    assert cache.next_image_ids() == [0, 0]
    codes = cache.stage(torch.tensor([[1, 2, 2], [0, 1, 1]]), torch.tensor([[-1, 0, 0], [-1, -1, -1]]))
    assert codes.shape == (2, 3, 3)
    cache.commit(3)
    assert cache.length == 3 and cache.room == 7 and cache.context.sequence_len_offset == 3
    assert cache.next_image_ids() == [1, 0]
    codes = unpack_token_codes(cache.stage(torch.tensor([[1], [2]]), torch.tensor([[-1], [0]])))
    assert codes.modality.tolist() == [[1, 2, 2, 1], [0, 1, 1, 2]]  # queries are the last positions
    assert codes.image_id.tolist() == [[-1, 0, 0, -1], [-1, -1, -1, 0]]


def test_rollback_and_limits():
    cache = KVCache(1, 4)
    cache.stage(torch.ones(1, 3, dtype=torch.long), torch.full((1, 3), -1))
    assert cache.length == 0  # staged, not committed: a failed forward leaves nothing behind
    cache.commit(3)
    with pytest.raises(ContextFullError, match="2 new positions do not fit: 3 of 4 are used"):
        cache.stage(torch.ones(1, 2, dtype=torch.long), torch.full((1, 2), -1))
    cache.truncate(1)
    assert cache.length == 1
    with pytest.raises(ValueError, match="cannot truncate"):
        cache.truncate(2)
    with pytest.raises(ValueError, match="batch size 1"):
        cache.stage(torch.ones(2, 1, dtype=torch.long), torch.full((2, 1), -1))
    cache.reset()
    assert cache.length == 0
    with pytest.raises(ValueError, match="must be >= 1"):
        KVCache(1, 0)
