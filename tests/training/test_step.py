"""masked_lm_loss: the mean over labelled positions; a microbatch without any label contributes a defined zero (the
reference code's 0/0 = NaN) and keeps the graph, so megatron-core's schedule can run its backward (at PP=2 the
earlier stage waits for that gradient) and every trainable parameter gets a gradient."""

import torch

from megatron_visualchat.testing.distributed import run_parallel

SEQ, MBS = 12, 2


def test_mean_over_labelled_positions():
    from megatron_visualchat.training.step import masked_lm_loss

    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    loss, logged = masked_lm_loss(mask, losses)
    assert float(loss) == (2.0 + 3.0 + 4.0) / 3
    assert logged["lm loss"].tolist() == [float(loss), 3.0]


def test_no_label_gives_zero_and_zero_gradients():
    from megatron_visualchat.training.step import masked_lm_loss

    weight = torch.nn.Parameter(torch.randn(3))
    losses = torch.randn(2, 3).exp() * weight
    loss, logged = masked_lm_loss(torch.zeros(2, 3), losses)
    assert float(loss.detach()) == 0.0 and logged["lm loss"].tolist() == [0.0, 0.0]
    loss.backward()
    assert torch.equal(weight.grad, torch.zeros(3))


def _batch(seed, labelled):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 256, (MBS, SEQ + 1), generator=g)
    mask = torch.ones(MBS, SEQ) if labelled else torch.zeros(MBS, SEQ)
    return dict(tokens=tokens[:, :-1], labels=tokens[:, 1:], loss_mask=mask,
                position_ids=torch.arange(SEQ).expand(MBS, SEQ))


def _with_and_without_an_unlabelled_microbatch():
    """Gradients of one labelled microbatch alone, and with an unlabelled one in the same schedule."""
    from megatron_visualchat.config import LLM_PRESETS, VisualChatConfig
    from megatron_visualchat.model.gpt import build_gpt_model
    from megatron_visualchat.testing.equivalence import current_parallel
    from megatron_visualchat.training.step import run_schedule

    torch.manual_seed(0)
    model = build_gpt_model(VisualChatConfig(llm=LLM_PRESETS["tiny"], parallel=current_parallel()))
    out = []
    for batches in ([_batch(0, True)], [_batch(0, True), _batch(1, False)]):
        model.zero_grad()
        losses = run_schedule([model], batches, num_microbatches=len(batches), seq_length=SEQ,
                              micro_batch_size=MBS)
        out.append(([d["lm loss"].tolist() for d in losses],
                    {n: p.grad.clone() for n, p in model.named_parameters()}))
    return out


def test_an_unlabelled_microbatch_in_a_pipeline_schedule_adds_nothing():
    for (alone_losses, alone), (mixed_losses, mixed) in run_parallel(_with_and_without_an_unlabelled_microbatch, pp=2):
        if alone_losses:  # last stage
            assert mixed_losses == [alone_losses[0], [0.0, 0.0]]
        assert alone.keys() == mixed.keys() and any(g.any() for g in alone.values())
        for name, g in alone.items():  # the schedule divides each microbatch's loss by their number
            assert torch.equal(mixed[name], g / 2), name
