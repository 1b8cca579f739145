import pytest
import torch

from megatron_visualchat.model.token_codes import (
    MODALITY_IMAGE,
    MODALITY_PAD,
    MODALITY_TEXT,
    NO_IMAGE,
    codes_from_layout,
    image_routing,
    pack_token_codes,
    unpack_token_codes,
)


def _codes():
    modality, image_id, _ = (torch.stack(c) for c in zip(*map(codes_from_layout, ["t00t", "tttp"])))
    return modality, image_id


def _packed():
    return pack_token_codes(*_codes())


def test_codes_from_layout():
    modality, image_id, sample_id = codes_from_layout("t00 1|tp")
    assert modality.tolist() == [MODALITY_TEXT, MODALITY_IMAGE, MODALITY_IMAGE, MODALITY_IMAGE, MODALITY_TEXT,
                                 MODALITY_PAD]
    assert image_id.tolist() == [NO_IMAGE, 0, 0, 1, NO_IMAGE, NO_IMAGE]
    assert sample_id.tolist() == [0, 0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="unknown character 'x'"):
        codes_from_layout("ttx")


def test_pack_round_trip_and_bad_shapes():
    modality, image_id = _codes()
    codes = unpack_token_codes(pack_token_codes(modality, image_id))
    assert torch.equal(codes.modality, modality) and torch.equal(codes.image_id, image_id)
    assert not codes.sample_id.any()
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
    packed[0, 0, 3] = MODALITY_IMAGE  # edited in place: not the cached layout
    assert image_routing(packed, 4) is not routing
