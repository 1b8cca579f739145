"""VisualChatModel (vision on the first stage, projector, in-order splicing, MMCA) gives the same loss and
gradients at TP=2, PP=2, TP=2 x PP=2 and PP=2 with 2 virtual stages (interleaved schedule) as at TP=1 from the
same weights, with images in the batch."""

import pytest
import torch

from megatron_visualchat.config import LLM_PRESETS, AttentionConfig, VisionConfig, VisualChatConfig
from megatron_visualchat.model.token_codes import MODALITY_TEXT, codes_from_layout, pack_token_codes
from megatron_visualchat.testing.distributed import run_parallel
from megatron_visualchat.testing.equivalence import (
    current_parallel, full_state_off_start, merge_rank_results, run_step_on_shard,
)
from megatron_visualchat.training.step import visualchat_forward_step

LLM = LLM_PRESETS["tiny"]
T = 17  # tiny encoder: CLS + 4x4 patches, linear projector keeps them all
ROWS = [["tt", 0, "ttt", 1, "tttt"], ["tttttt", 0, "tttttttttttttppppppp"]]  # 2 + 1 images; text before the first
MBS, NUM_MB = 2, 2


def _layout(row):
    return "".join(part if isinstance(part, str) else str(part) * T for part in row)


SEQ = len(_layout(ROWS[0]))


def _cfg(split="qkvo"):
    return VisualChatConfig(llm=LLM, attention=AttentionConfig(mode="mmca", modality_split=split),
                            vision=VisionConfig(encoder="tiny", projector="linear"), parallel=current_parallel())


def _batches():
    out = []
    for i in range(NUM_MB):
        g = torch.Generator().manual_seed(i)
        codes = [codes_from_layout(_layout(r)) for r in ROWS]
        modality, image_id, sample_id = (torch.stack(c) for c in zip(*codes))
        num_images = torch.tensor([2, 1])
        out.append(dict(
            tokens=torch.randint(0, LLM.vocab_size, (MBS, SEQ), generator=g),
            labels=torch.randint(0, LLM.vocab_size, (MBS, SEQ), generator=g),
            loss_mask=(modality == MODALITY_TEXT).float(), position_ids=torch.arange(SEQ).expand(MBS, SEQ),
            attention_mask=pack_token_codes(modality, image_id, sample_id),
            pixel_values=torch.randn(int(num_images.sum()), 3, 32, 32, generator=g), num_images=num_images))
    return out


def _build(vp_stage=None):
    from megatron_visualchat.model.visualchat import VisualChatModel, apply_trainable_policy

    model = VisualChatModel(_cfg(), vp_stage=vp_stage)
    apply_trainable_policy(model, model.cfg.trainable)
    return model


def _full():
    torch.manual_seed(11)
    model = _build()
    return full_state_off_start(model)


def _step(full):
    return run_step_on_shard(_build, full, LLM, _batches(), seq_length=SEQ, micro_batch_size=MBS,
                             forward_step=visualchat_forward_step)


@pytest.fixture(scope="module")
def full():
    return run_parallel(_full)[0]


@pytest.fixture(scope="module")
def reference(full):
    return merge_rank_results(run_parallel(_step, args=(full,)), 1)


def test_only_policy_trainable_parameters_get_gradients(reference):
    _, grads = reference
    assert grads, "some parameters must train"
    assert all(k.startswith("vision.projector.") or k.endswith("image_weight") for k in grads), sorted(grads)
    assert any(k.startswith("vision.projector.") for k in grads)
    zero = sorted(k for k, g in grads.items() if not g.any())
    # The last layer's image-side output projection only feeds image positions, which carry no loss.
    assert zero == [f"language_model.decoder.layers.{LLM.num_layers - 1}.self_attention.linear_proj.image_weight"]


@pytest.mark.parametrize("tp,pp,vpp", [(2, 1, None), (1, 2, None), (2, 2, None), (1, 2, 2)])
def test_layouts_match_single_process(full, reference, tp, pp, vpp):
    ref_loss, ref_grads = reference
    loss, grads = merge_rank_results(run_parallel(_step, tp=tp, pp=pp, vpp=vpp, args=(full,)), tp)
    assert abs(loss - ref_loss) < 1e-5 * max(1.0, abs(ref_loss))
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
