"""``megatron-visualchat validate-data``: every record checked once, the skip table and first offenders printed."""

import io

import pytest

from megatron_visualchat.cli import main as cli_main
from megatron_visualchat.data.validate import main


def record(image="ok.png", question="What colour?"):
    return {"rounds": [{"images": [image], "question": question, "answer": "red"}]}


@pytest.fixture
def tok_dir(tok, tmp_path):
    tok.save(str(tmp_path / "tok"))
    return str(tmp_path / "tok")


def run(argv) -> tuple[int, str]:
    out = io.StringIO()
    return main(argv, stdout=out), out.getvalue()


def test_a_clean_blend_exits_0(tok_dir, write_png, write_jsonl):
    write_png("ok.png")
    a = write_jsonl("a.jsonl", [record(), record()])
    code, text = run(["--data", f"jsonl:{a}:0.7", "--data", f"jsonl:{a}", "--tokenizer-dir", tok_dir,
                      "--seq-length", "300", "--image-tokens", "4"])
    assert code == 0 and "4 record(s) in 2 file(s): 4 usable, 0 skipped" in text


def test_skips_are_tabled_by_reason_with_the_first_offenders(tok_dir, tmp_path, write_png, write_jsonl):
    write_png("images/ok.png")
    bad = write_jsonl("d.jsonl", [record(), record("gone.png"), '{"rounds": [', record("../d.jsonl"),
                                  record("gone2.png"), record(question="red green blue " * 200)])
    code, text = run(["--data", f"jsonl:{bad}", "--image-root", str(tmp_path / "images"), "--tokenizer-dir", tok_dir,
                      "--seq-length", "300", "--image-tokens", "4"])
    assert code == 1
    assert "6 record(s) in 1 file(s): 1 usable, 5 skipped" in text
    for row in ("| missing_image | 2 |", "| malformed_json | 1 |", "| image_outside_root | 1 |", "| too_long | 1 |"):
        assert row in text
    assert text.index("| missing_image | 2 |") < text.index("| malformed_json | 1 |")  # most frequent first
    assert f"{bad}  record 1  {bad}:line 2: missing_image: " in text and "gone.png: not found" in text
    assert f"{bad}  record 4  {bad}:line 5: missing_image" in text
    assert f"{bad}  record 2  {bad}:line 3: malformed_json" in text


def test_registered_as_a_cli_command(tok_dir, write_png, write_jsonl, capsys):
    write_png("ok.png")
    path = write_jsonl("a.jsonl", [record("gone.png"), record()])
    argv = ["validate-data", "--data", f"jsonl:{path}", "--tokenizer-dir", tok_dir, "--seq-length", "300",
            "--image-tokens", "4"]
    assert cli_main(argv) == 1
    assert "| missing_image | 1 |" in capsys.readouterr().out


def test_data_that_cannot_be_opened_exits_2(tok_dir, tmp_path):
    (tmp_path / "bad.json").write_bytes(b"[\xff]")
    code, text = run(["--data", f"llava:{tmp_path / 'bad.json'}", "--tokenizer-dir", tok_dir])
    assert code == 2 and "bad.json: not UTF-8 at byte 1" in text
    code, text = run(["--data", "nonsense", "--tokenizer-dir", tok_dir])
    assert code == 2 and "dataset spec 'nonsense'" in text
    (tmp_path / "empty.jsonl").write_text("\n")
    code, text = run(["--data", f"jsonl:{tmp_path / 'empty.jsonl'}", "--tokenizer-dir", tok_dir])
    assert code == 2 and "no records" in text
