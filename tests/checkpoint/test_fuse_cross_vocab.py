"""``fuse --method cross`` of parents with different tokenizers (docs/fusion.md "Vocabulary"): a text LLM A and an
image-code model B (``test_vocab_merge``'s parents). Both towers read the merged vocabulary, each tower's rows
follow the rule exactly, the merged tokenizer loads, and the model built from the record gives parent A's logits on
A's tokens and parent B's on the tokens only B has while the gates are closed (TP=2, the head's B half split)."""

import pytest
import torch

from megatron_visualchat.checkpoint.fuse import FullTensorReader, main
from megatron_visualchat.checkpoint.fuse_cross import TOWER_DIRS, JamCrossRecord
from megatron_visualchat.checkpoint.legacy_format import VOCAB_KEYS
from megatron_visualchat.checkpoint.vocab_merge import MERGED_TOKENIZER_DIR
from megatron_visualchat.data.tokenizer import VisualChatTokenizer
from megatron_visualchat.testing.distributed import run_parallel

from ..model.test_jam_cross import _logits
from .conftest import hf_logits
from .test_vocab_merge import A_TEXT, B_TEXT, CODES, _expected_ids, _parent


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    """The parents and their cross fusion at TP=2; for every merged id, (A's row or -1, B's row or -1)."""
    root = tmp_path_factory.mktemp("cross_vocab")
    (a, tok_a), (b, tok_b) = _parent(root, "a", A_TEXT, 0, 0, False), _parent(root, "b", B_TEXT, CODES, 1, True)
    parents = dict(a=a, b=b, tok_a=tok_a, tok_b=tok_b, root=root)
    out = root / "x"
    assert main(["--method", "cross", "--model-a", str(a), "--model-b", str(b), "--out", str(out),
                 "--cross-interval", "2", "--tp", "2"]) == 0
    merged, a_ids, b_ids = _expected_ids(parents, out)
    rows_a = FullTensorReader(a).record.llm.vocab_size  # A has rows for its pieces only
    return dict(parents, out=out, merged=merged, a_ids=[i if i < rows_a else -1 for i in a_ids], b_ids=b_ids)


def test_tower_rows_follow_the_rule(fused):
    """Tower T: its parent's rows for its parent's tokens; for the other's own tokens the other's embedding row and
    a zero output row. The record's head_b_rows are exactly B's own tokens."""
    parents = (FullTensorReader(fused["a"]), FullTensorReader(fused["b"]))
    pairs = list(zip(fused["a_ids"], fused["b_ids"]))
    for own, tower in enumerate(TOWER_DIRS):
        got = FullTensorReader(fused["out"] / tower)
        assert (got.record.llm.vocab_size, got.record.hf_config["vocab_size"], got.record.parallel.tp) == (
            len(pairs), len(pairs), 2)
        for name in VOCAB_KEYS:
            t, rows = got.read(name), [p.read(name) for p in parents]
            for m, ids in enumerate(pairs):
                side = own if ids[own] >= 0 else 1 - own
                take = ids[side] >= 0 and (side == own or name.endswith("word_embeddings.weight"))
                assert torch.equal(t[m], rows[side][ids[side]] if take else torch.zeros_like(t[m])), (tower, name, m)
    b_only = [m for m, (i, j) in enumerate(pairs) if i < 0 <= j]
    record = JamCrossRecord.find(fused["out"])
    assert [m for start, stop in record.head_b_rows for m in range(start, stop)] == b_only
    assert len(b_only) > 10 and record.llm.vocab_size == len(pairs)
    vocab = record.fused_from["vocabulary"]
    assert (vocab["rows_from_b_only"], vocab["model_b_tokenizer"]["sp_model_sha256"]) == (
        len(b_only), fused["tok_b"].sha256)


def test_merged_tokenizer_loads_and_encodes_as_a(fused):
    for where in (fused["out"], *(fused["out"] / t for t in TOWER_DIRS)):
        tok = VisualChatTokenizer.load(str(where / MERGED_TOKENIZER_DIR))
        assert (tok.sha256, tok.vocab_size) == (fused["merged"].sha256, len(fused["a_ids"]))
        assert all(tok.encode(text) == fused["tok_a"].encode(text) for text in A_TEXT + B_TEXT)


def test_closed_gates_give_a_logits_on_a_tokens_and_b_logits_on_b_tokens(fused):
    """Input tokens both parents have, so that tower B reads what parent B would (by B's ids)."""
    a_ids, b_ids = fused["a_ids"], fused["b_ids"]
    shared = torch.tensor([m for m, (i, j) in enumerate(zip(a_ids, b_ids)) if i >= 0 and j >= 0])
    tokens = shared[torch.randint(0, len(shared), (2, 11), generator=torch.Generator().manual_seed(0))]
    got = run_parallel(_logits, tp=2, args=(str(fused["out"]), tokens))[0]["closed"]
    root = fused["root"]
    a_tok = [m for m, i in enumerate(a_ids) if i >= 0]
    b_only = [m for m, (i, j) in enumerate(zip(a_ids, b_ids)) if i < 0 <= j]
    want_a = hf_logits(root / "a_hf", tokens)[..., [a_ids[m] for m in a_tok]]
    want_b = hf_logits(root / "b_hf", torch.tensor(b_ids)[tokens])[..., [b_ids[m] for m in b_only]]
    torch.testing.assert_close(got[..., a_tok], want_a, rtol=0, atol=1e-6)  # measured: 2.5e-7 (fp32)
    torch.testing.assert_close(got[..., b_only], want_b, rtol=0, atol=1e-6)  # measured: 1.5e-7
    assert len(a_tok) + len(b_only) == got.shape[-1]  # no token without a row here
