import json

import pytest

from megatron_visualchat.data import SampleError
from megatron_visualchat.data.lazy import (
    JsonlRecords,
    PackedRecords,
    index_base64_tsv,
    index_json_string_map,
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
