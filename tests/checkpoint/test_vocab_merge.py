"""``fuse`` of parents with different vocabularies (``checkpoint/vocab_merge.py``): a text LLM A fused with an
image-code model B whose sentencepiece model differs and which has an image vocabulary. The merged tokenizer
encodes A's text as A and decodes B's own tokens as B; every embedding / output row follows the rule exactly, the
TP=2 x PP=2 shards pad the merged size; at alpha=1 the fused model gives A's logits on A's tokens (transformers)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from megatron_visualchat.checkpoint.convert import TOKENIZER_DIR, hf_to_megatron, megatron_to_hf
from megatron_visualchat.checkpoint.errors import CheckpointError
from megatron_visualchat.checkpoint.fuse import FuseOptions, FullTensorReader, fuse_checkpoints, main
from megatron_visualchat.checkpoint.legacy_format import VOCAB_KEYS, ConversionRecord, rank_file
from megatron_visualchat.checkpoint.vocab_merge import MERGED_TOKENIZER_DIR
from megatron_visualchat.data.tokenizer import MODEL_FILE, VisualChatTokenizer, train_tiny_sentencepiece

from .conftest import TINY, hf_logits

A_TEXT = ["the quick brown fox jumps over the lazy dog", "hello world, the shapes are red and blue"]
B_TEXT = ["zebra zigzag quizzes buzz fizz", "hello world, the colours are green and yellow"]
CODES = 4  # B's image codebook


def _parent(root: Path, name: str, corpus: list[str], codes: int, seed: int, rows_for_added: bool) -> tuple:
    """A converted tiny LLaMA with its own sentencepiece tokenizer (and image vocabulary); returns (dir, tok)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    train_tiny_sentencepiece(str(root / f"{name}_tok"), corpus * 20, 300)
    tok = VisualChatTokenizer((root / f"{name}_tok" / MODEL_FILE).read_bytes(), codes)
    torch.manual_seed(seed)
    rows = tok.vocab_size if rows_for_added else tok.sp_vocab_size
    hf = root / f"{name}_hf"
    LlamaForCausalLM(LlamaConfig(**dict(TINY, vocab_size=rows))).save_pretrained(hf)
    tok.save(str(root / f"{name}_tok"))
    shutil.copy(root / f"{name}_tok" / MODEL_FILE, hf / MODEL_FILE)
    # HF's files naming the added tokens by A's ids (as a LLaVA tokenizer does): fuse renumbers them
    (hf / "added_tokens.json").write_text(json.dumps(tok.added_tokens))
    (hf / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "added_tokens_decoder": {
        str(i): {"content": t, "special": True} for t, i in tok.added_tokens.items()}}))
    out = hf_to_megatron(hf, root / name, dtype="fp32")
    if codes:
        tok.save(str(out / MERGED_TOKENIZER_DIR))
    return out, tok


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    """A: a text LLM (rows for its pieces only); B: an image-code model (rows for pieces, added tokens, codes)."""
    root = tmp_path_factory.mktemp("vocab")
    (a, tok_a), (b, tok_b) = _parent(root, "a", A_TEXT, 0, 0, False), _parent(root, "b", B_TEXT, CODES, 1, True)
    return dict(a=a, b=b, tok_a=tok_a, tok_b=tok_b, hf_a=root / "a_hf", root=root)


def _pieces(tok_dir: Path) -> list[str]:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(tok_dir / MODEL_FILE))
    return [sp.id_to_piece(i) for i in range(sp.get_piece_size())]


def _expected_ids(parents, out: Path) -> tuple[VisualChatTokenizer, list, list]:
    """The merged tokenizer (what --tokenizer-dir loads) and, for every merged id, (A's id or -1, B's id or -1) by
    spelling, following the documented rule."""
    merged = VisualChatTokenizer.load(str(out / MERGED_TOKENIZER_DIR))
    ta, tb = parents["tok_a"], parents["tok_b"]
    pa, pb = _pieces(parents["root"] / "a_tok"), _pieces(parents["root"] / "b_tok")
    b_only = [p for p in pb if p not in pa]
    spelled = pa + b_only
    assert _pieces(out / MERGED_TOKENIZER_DIR) == spelled
    a_ids = [i if i < len(pa) else -1 for i in range(len(spelled))]
    b_ids = [pb.index(p) if p in pb else -1 for p in spelled]
    a_ids += [ta.added_tokens[t] for t in merged.added_tokens]
    b_ids += [tb.added_tokens[t] for t in merged.added_tokens]
    a_ids += [-1] * merged.image_vocab.num_tokens  # A has no image vocabulary
    b_ids += list(range(tb.image_vocab.base_id, tb.vocab_size))
    return merged, a_ids, b_ids


def test_merged_tokenizer_encodes_a_as_a_and_decodes_b_as_b(parents, tmp_path, capsys):
    out = tmp_path / "u"
    assert main(["--method", "uniform", "--model-a", str(parents["a"]), "--model-b", str(parents["b"]),
                 "--out", str(out)]) == 0
    assert f"--tokenizer-dir {out / MERGED_TOKENIZER_DIR}" in capsys.readouterr().out
    merged, a_ids, b_ids = _expected_ids(parents, out)
    ta, tb = parents["tok_a"], parents["tok_b"]
    for text in A_TEXT + B_TEXT + ["zebra fox quizzes the dog"]:
        assert merged.encode(text) == ta.encode(text), text
    b_only = [m for m, (i, j) in enumerate(zip(a_ids, b_ids)) if i < 0 and j >= 0]
    assert len(b_only) > 10
    for m in b_only:
        assert merged.decode([m]) == tb.decode([b_ids[m]]), m
        assert merged.decode([5, m, 7]) == tb.decode([b_ids[5], b_ids[m], b_ids[7]]), m  # between byte pieces
    assert merged.image_codebook_size == CODES and merged.vocab_size == len(a_ids)
    assert (out / TOKENIZER_DIR / MODEL_FILE).read_bytes() == (out / MERGED_TOKENIZER_DIR / MODEL_FILE).read_bytes()


@pytest.mark.parametrize("method", ["uniform", "width"])
def test_fused_rows_follow_the_rule_and_tp2_pp2_shards_pad(parents, tmp_path, method):
    opts = FuseOptions(alpha=0.25) if method == "uniform" else FuseOptions()
    out = fuse_checkpoints(parents["a"], parents["b"], tmp_path / method, method=method, options=opts, tp=2, pp=2)
    record = ConversionRecord.load(out)
    _, a_ids, b_ids = _expected_ids(parents, out)
    assert record.llm.vocab_size == len(a_ids)  # B has rows up to its last image token
    padded = record.llm.padded_vocab_size(2)
    fused, a, b = FullTensorReader(out), FullTensorReader(parents["a"]), FullTensorReader(parents["b"])
    ha = a.record.llm.hidden_size  # = B's
    a_ids = [i if i < a.record.llm.vocab_size else -1 for i in a_ids]  # A has no rows for <image>, <pad>
    for name in VOCAB_KEYS:
        stage = 0 if name.startswith("embedding") else 1
        shards = [torch.load(rank_file(out, 0, r, stage, 2), weights_only=True)["model"][name] for r in range(2)]
        full = torch.cat(shards)
        assert all(s.shape[0] == padded // 2 for s in shards) and not full[len(a_ids):].any()
        got, ra, rb = fused.read(name), a.read(name), b.read(name)
        for m, (i, j) in enumerate(zip(a_ids, b_ids)):
            if method == "uniform":
                want = 0.25 * ra[i] + 0.75 * rb[j] if i >= 0 and j >= 0 else (ra[i] if i >= 0 else rb[j])
            else:  # [A's half | B's half], zeros where a parent lacks the token; output rows of shared tokens / 2
                halves = [ra[i] if i >= 0 else torch.zeros(ha), rb[j] if j >= 0 else torch.zeros(ha)]
                want = torch.cat(halves) / (2 if name == "output_layer.weight" and i >= 0 and j >= 0 else 1)
            assert torch.equal(got[m], want), (name, m)
    vocab = record.hf_config["fused_from"]["vocabulary"]
    pairs = list(zip(a_ids, b_ids))
    counts = [sum(i >= 0 and j >= 0 for i, j in pairs), sum(i >= 0 > j for i, j in pairs),
              sum(j >= 0 > i for i, j in pairs)]
    assert [vocab[k] for k in ("rows_from_both", "rows_from_a_only", "rows_from_b_only", "zero_rows")] == [*counts, 0]
    assert min(counts) > 10
    assert vocab["model_a_tokenizer"]["sp_model_sha256"] == parents["tok_a"].sha256
    assert vocab["model_b_tokenizer"]["sp_model_sha256"] == parents["tok_b"].sha256


def test_alpha_one_gives_model_as_logits_on_as_tokens(parents, tmp_path):
    out = fuse_checkpoints(parents["a"], parents["b"], tmp_path / "u1", method="uniform",
                           options=FuseOptions(alpha=1.0))
    hf = megatron_to_hf(out, tmp_path / "u1_hf")
    n = parents["tok_a"].sp_vocab_size
    tokens = torch.randint(0, n, (2, 11), generator=torch.Generator().manual_seed(0))
    got = hf_logits(hf, tokens)
    assert got.shape[-1] == ConversionRecord.load(out).llm.vocab_size
    torch.testing.assert_close(got[..., :n], hf_logits(parents["hf_a"], tokens), rtol=0, atol=1e-6)  # measured: 0
    from transformers import AutoTokenizer

    hf_tok, merged = AutoTokenizer.from_pretrained(hf), VisualChatTokenizer.load(str(out / MERGED_TOKENIZER_DIR))
    assert hf_tok.convert_tokens_to_ids(["<image>", "<pad>"]) == [merged.image_id, merged.pad_id] != [n, n + 1]
    assert hf_tok(A_TEXT[0], add_special_tokens=False)["input_ids"] == parents["tok_a"].encode(A_TEXT[0])


def _swap_bos_eos(tok_dir: Path) -> bytes:
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString((tok_dir / MODEL_FILE).read_bytes())
    model.trainer_spec.bos_id, model.trainer_spec.eos_id = 2, 1
    return model.SerializeToString()


@pytest.mark.parametrize("conflict,message", [("specials", "conflicting special tokens.*bos"),
                                              ("codebooks", "image vocabularies of 3 and 4 codes")])
def test_conflicts_are_refused_and_write_nothing(parents, tmp_path, conflict, message):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(parents["a"], a)
    shutil.copytree(parents["b"], b)
    if conflict == "specials":
        VisualChatTokenizer(_swap_bos_eos(b / MERGED_TOKENIZER_DIR), CODES).save(str(b / MERGED_TOKENIZER_DIR))
    else:  # A gains an image vocabulary of another size
        VisualChatTokenizer((a / TOKENIZER_DIR / MODEL_FILE).read_bytes(), 3).save(str(a / MERGED_TOKENIZER_DIR))
    with pytest.raises(CheckpointError, match=message):
        fuse_checkpoints(a, b, tmp_path / "out", method="uniform")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
