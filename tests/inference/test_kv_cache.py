"""KVCache keeps the codes of cached positions next to megatron-core's K/V, commits only after a forward,
rolls back by moving the offset, and refuses what does not fit."""

import pytest
import torch

from megatron_visualchat.inference.kv_cache import ContextFullError, KVCache
from megatron_visualchat.model.token_codes import codes_from_layout, unpack_token_codes


def _codes(*rows: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L] (modality, image_id) of one ``codes_from_layout`` string per row (``t`` text, ``p`` pad, a digit an
    image token of that image)."""
    codes = [codes_from_layout(row) for row in rows]
    return torch.stack([c[0] for c in codes]), torch.stack([c[1] for c in codes])


def test_codes_of_cached_and_new_positions_travel_together():
    cache = KVCache(2, 10)
    assert cache.next_image_ids() == [0, 0]
    codes = cache.stage(*_codes("t00", "ptt"))
    assert codes.shape == (2, 3, 3)
    cache.commit(3)
    assert cache.length == 3 and cache.room == 7 and cache.context.sequence_len_offset == 3
    assert cache.next_image_ids() == [1, 0]
    codes = unpack_token_codes(cache.stage(*_codes("t", "0")))
    modality, image_id = _codes("t00t", "ptt0")  # queries are the last positions
    assert codes.modality.tolist() == modality.tolist()
    assert codes.image_id.tolist() == image_id.tolist()


def test_rollback_and_limits():
    cache = KVCache(1, 4)
    cache.stage(*_codes("ttt"))
    assert cache.length == 0  # staged, not committed: a failed forward leaves nothing behind
    cache.commit(3)
    with pytest.raises(ContextFullError, match="2 new positions do not fit: 3 of 4 are used"):
        cache.stage(*_codes("tt"))
    cache.truncate(1)
    assert cache.length == 1
    with pytest.raises(ValueError, match="cannot truncate"):
        cache.truncate(2)
    with pytest.raises(ValueError, match="batch size 1"):
        cache.stage(*_codes("t", "t"))
    cache.reset()
    assert cache.length == 0
    with pytest.raises(ValueError, match="must be >= 1"):
        KVCache(1, 0)
