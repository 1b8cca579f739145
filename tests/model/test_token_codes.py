import pytest
import torch

from megatron_visualchat.model.token_codes import image_routing, pack_token_codes, unpack_token_codes


def _packed():
    modality = torch.tensor([[1, 2, 2, 1], [1, 1, 1, 0]])
    image_id = torch.tensor([[-1, 0, 0, -1], [-1, -1, -1, -1]])
    return pack_token_codes(modality, image_id)


def test_pack_round_trip_and_bad_shapes():
    codes = unpack_token_codes(_packed())
    assert codes.modality.tolist() == [[1, 2, 2, 1], [1, 1, 1, 0]] and not codes.sample_id.any()
    with pytest.raises(ValueError, match="one \\[B, L\\] shape"):
        pack_token_codes(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="pack_token_codes"):
        unpack_token_codes(torch.zeros(2, 4, dtype=torch.long))


def test_image_routing_is_computed_once_per_codes_tensor():
    packed = _packed()
    routing = image_routing(packed, 4)
    assert routing.mask.tolist() == [[False, False], [True, False], [True, False], [False, False]]  # [s, b]
    assert routing.image_idx.tolist() == [2, 4] and routing.any_image
    assert image_routing(packed, 4) is routing  # every layer of a forward shares it
    decode = image_routing(packed, 1)  # the last position only
    assert decode.mask.shape == (1, 2) and not decode.any_image
    packed[0, 0, 3] = 2  # edited in place: not the cached layout
    assert image_routing(packed, 4) is not routing
