import json
import os

import pytest

from megatron_visualchat.data import SampleError
from megatron_visualchat.data.lazy import (
    JsonlRecords,
    PackedRecords,
    index_base64_tsv,
    index_json_string_map,
    load_json,
    open_records,
    read_range,
)


def test_jsonl_index_skips_blank_lines_and_reports_line_numbers(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"x": 1}\n\n{"x": 2}\n{broken\n[1, 2]\n')
    records = JsonlRecords(str(path))
    assert len(records) == 4
    assert records.get(1) == {"x": 2} and records.where(1).endswith("a.jsonl:line 3")
    for index, line in ((2, 4), (3, 5)):
        with pytest.raises(SampleError, match=f"a.jsonl:line {line}: malformed_json"):
            records.get(index)


def test_jsonl_records_are_read_on_access(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"x": 1}\n{"x": 2}\n')
    records = JsonlRecords(str(path))
    path.write_text('{"x": 1}\n{"x": 9}\n')  # same length: the index still fits, the content is new
    assert records.get(1) == {"x": 9}


def test_packed_records_and_open_records(tmp_path):
    packed = PackedRecords([{"a": 1}, "oops"], "f.json", labels=["data[A]", "data[B]"])
    assert packed.get(0) == {"a": 1} and packed.where(1) == "f.json:data[B]"
    with pytest.raises(SampleError, match="malformed_json"):
        packed.get(1)
    (tmp_path / "arr.json").write_text(json.dumps([{"a": 1}, {"a": 2}]))
    assert open_records(str(tmp_path / "arr.json")).get(1) == {"a": 2}
    (tmp_path / "obj.json").write_text("{}")
    with pytest.raises(ValueError, match="JSON array"):
        open_records(str(tmp_path / "obj.json"))
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        open_records(str(tmp_path / "bad.json"))


def test_json_string_map_index(tmp_path):
    data = {"k1": "AAAA", 'we"ird': "B\\/B", "k3": ""}
    path = tmp_path / "m.json"
    path.write_text(json.dumps(data, indent=1))
    index = index_json_string_map(str(path))
    assert set(index) == set(data)
    assert read_range(str(path), *index["k1"]) == b"AAAA"
    assert read_range(str(path), *index['we"ird']) == b"B\\\\/B"
    assert index["k3"][1] == 0
    (tmp_path / "e.json").write_text("{ }")
    assert index_json_string_map(str(tmp_path / "e.json")) == {}
    (tmp_path / "n.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="not a string"):
        index_json_string_map(str(tmp_path / "n.json"))
    (tmp_path / "l.json").write_text('["a"]')
    with pytest.raises(ValueError, match="JSON object"):
        index_json_string_map(str(tmp_path / "l.json"))


def test_tsv_index(tmp_path):
    path = tmp_path / "x.tsv"
    path.write_bytes(b"a\tAAAA\nb\tBB\r\n\n")
    index = index_base64_tsv(str(path))
    assert read_range(str(path), *index["a"]) == b"AAAA" and read_range(str(path), *index["b"]) == b"BB"
    path.write_bytes(b"a\tAAAA\nno tab here\n")
    with pytest.raises(ValueError, match="line 2"):
        index_base64_tsv(str(path))


def test_a_json_file_that_is_not_utf8_names_file_byte_and_line(tmp_path):
    path = tmp_path / "llava.json"
    path.write_bytes(b'[{"a": "caf\xc3\xa9"},\n {"a": "caf\xe9"}]')  # UTF-8, then one Latin-1 byte on line 2
    with pytest.raises(ValueError, match=r"llava.json: not UTF-8 at byte 28 \(line 2: .*b'\\xe9'.*re-encode"):
        open_records(str(path))


def test_a_jsonl_line_that_is_not_utf8_is_one_malformed_record(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"x": 1}\n{"x": "caf\xe9"}\n{"x": 3}\n')
    records = JsonlRecords(str(path))
    assert records.get(0) == {"x": 1} and records.get(2) == {"x": 3}
    with pytest.raises(SampleError, match=r"a.jsonl:line 2: malformed_json: line is not UTF-8 .*re-encode"):
        records.get(1)


def test_image_store_ids_that_are_not_utf8_name_the_place(tmp_path):
    (tmp_path / "x.tsv").write_bytes(b"a\tAAAA\nb\xff\tBB\n")
    with pytest.raises(ValueError, match=r"x.tsv:line 2: the id is not UTF-8 .*re-encode"):
        index_base64_tsv(str(tmp_path / "x.tsv"))
    (tmp_path / "m.json").write_bytes(b'{"k\xff": "AAAA"}')
    with pytest.raises(ValueError, match=r"m.json: the key at byte 1 is not UTF-8 .*re-encode"):
        index_json_string_map(str(tmp_path / "m.json"))


def test_annotation_files_must_be_regular_files(tmp_path):
    os.mkfifo(tmp_path / "pipe.jsonl")
    with pytest.raises(ValueError, match="pipe.jsonl: not a regular file"):
        open_records(str(tmp_path / "pipe.jsonl"))
    os.mkfifo(tmp_path / "pipe.json")
    with pytest.raises(ValueError, match="pipe.json: not a regular file"):
        load_json(str(tmp_path / "pipe.json"))
