"""Reading labelled texts: CSV, TSV and JSON Lines, and every bad input named by file and line."""

from __future__ import annotations

import json
import re

import pytest

from pipeline.core.errors import StageError
from pipeline.modalities.text.files import data_files, natural_order, read_labels_file, read_rows


def test_csv_with_quotes_commas_and_a_byte_order_mark_reads_with_its_line_numbers(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(
        "\ufefflabel,id,text\n"
        'world,1,"Vote counting begins, at last."\n'
        "\n"
        'sports,2,"He said ""we won"" and\nleft"\n'
        "scitech,3,Plain text with no quotes\n".encode()
    )
    rows = read_rows(path, "text", "label")
    assert rows.texts == [
        "Vote counting begins, at last.",
        'He said "we won" and\nleft',
        "Plain text with no quotes",
    ]
    assert rows.labels == ["world", "sports", "scitech"]
    assert rows.sources == [f"{path}:2", f"{path}:5", f"{path}:6"]  # a quoted text may span lines


def test_tsv_and_json_lines_read_the_columns_params_name(tmp_path):
    tsv = tmp_path / "train.tsv"
    tsv.write_text("body\ttopic\nsome text\ta\nmore text\tb\n")
    assert read_rows(tsv, "body", "topic").labels == ["a", "b"]
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text(
        json.dumps({"body": "x y", "topic": 3}) + "\n\n" + json.dumps({"body": "z", "topic": 1}) + "\n"
    )
    rows = read_rows(jsonl, "body", "topic")
    assert rows.texts == ["x y", "z"] and rows.labels == ["3", "1"]
    assert rows.sources == [f"{jsonl}:1", f"{jsonl}:3"]


def test_a_missing_column_names_the_columns_found(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("sentence,label\nhello,a\n")
    with pytest.raises(StageError) as error:
        read_rows(path, "text", "label")
    assert str(error.value) == (
        f"{path}: no column data.text_column: 'text'; the columns found are: 'sentence', 'label'; "
        "set data.text_column and data.label_column"
    )
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text(json.dumps({"text": "a", "class": "x"}) + "\n")
    with pytest.raises(StageError, match=re.escape(f"{jsonl}: line 1: no column data.label_column: 'label'")):
        read_rows(jsonl, "text", "label")


def test_bytes_that_are_not_utf8_name_the_file_and_line(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(b"text,label\nfine,a\ncaf\xe9 au lait,b\n")
    with pytest.raises(StageError) as error:
        read_rows(path, "text", "label")
    assert str(error.value).startswith(f"{path}: line 3: not UTF-8 text (byte 0xe9); save the file as UTF-8")


def test_bad_rows_are_all_listed_by_line(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("text,label\ngood,a\ntoo,many,fields\nno label,\nalso good,b\n")
    with pytest.raises(StageError) as error:
        read_rows(path, "text", "label")
    assert str(error.value) == (
        f"{path}: 2 row(s) this pipeline cannot read:\n"
        "  line 3: 3 fields, the header has 2\n"
        "  line 4: an empty label"
    )
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text('{"text": "a", "label": "x"}\n[1, 2]\n{"text": 5, "label": "y"}\n{oops\n')
    with pytest.raises(StageError) as error:
        read_rows(jsonl, "text", "label")
    lines = str(error.value).splitlines()[1:]
    assert lines[0] == "  line 2: a JSON list, not an object"
    assert lines[1] == "  line 3: the text is 5, not a string"
    assert lines[2].startswith("  line 4: not JSON (")


def test_an_unknown_format_is_named(tmp_path):
    path = tmp_path / "train.xlsx"
    path.write_bytes(b"PK")
    with pytest.raises(StageError, match=r"train\.xlsx: not a format for texts; use \.csv, \.tsv or \.jsonl"):
        read_rows(path, "text", "label")


def test_data_files_are_a_file_or_a_folder_s_split_files(tmp_path):
    (tmp_path / "one").mkdir()
    single = tmp_path / "one" / "news.csv"
    single.write_text("text,label\n")
    assert data_files(single) == {"all": single}
    assert data_files(tmp_path / "one") == {"all": single}  # a folder of one file
    folder = tmp_path / "splits"
    folder.mkdir()
    for name in ("train.csv", "validation.jsonl", "test.tsv", "README.md"):
        (folder / name).write_text("")
    assert data_files(folder) == {
        "train": folder / "train.csv",
        "val": folder / "validation.jsonl",
        "test": folder / "test.tsv",
    }
    (folder / "train.csv").unlink()
    with pytest.raises(StageError, match=r"holds no train file; .* \(found: test\.tsv, validation\.jsonl\)"):
        data_files(folder)
    with pytest.raises(StageError, match="is neither a file nor a folder"):
        data_files(tmp_path / "absent")


def test_labels_file_and_natural_order(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("zebra\n\napple\n")
    assert read_labels_file(labels) == ["zebra", "apple"]
    labels.write_text("a\nb\na\n")
    with pytest.raises(StageError, match="names a class more than once: a"):
        read_labels_file(labels)
    assert natural_order({"10", "2", "1"}) == ["1", "2", "10"]
    assert natural_order({"b", "a", "10"}) == ["10", "a", "b"]


def test_json_lines_split_at_line_ends_only(tmp_path):
    """U+2028, U+0085 and form feeds are legal inside a JSON string; only \\n ends a line."""
    path = tmp_path / "news.jsonl"
    rows = [{"text": "first\u2028line", "label": "a"}, {"text": "second\x85\x0c", "label": "b"}]
    path.write_text(
        "\r\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\r\n", encoding="utf-8"
    )
    read = read_rows(path, "text", "label")
    assert read.texts == ["first\u2028line", "second\x85\x0c"]
    assert read.sources == [f"{path}:1", f"{path}:2"]


def test_a_csv_field_longer_than_the_csv_modules_default_cap_reads(tmp_path):
    path = tmp_path / "long.csv"
    article = "word " * 40_000  # 200,000 characters; the csv module stops at 131,072 by default
    path.write_text(f'text,label\n"{article}",a\nshort,b\n', encoding="utf-8")
    assert [len(text) for text in read_rows(path, "text", "label").texts] == [200_000, 5]


def test_json_labels_are_strings_or_whole_numbers_and_name_one_class_either_way(tmp_path):
    path = tmp_path / "labels.jsonl"
    labels = ["1", 1, 1.0, True, None, 2]
    path.write_text(
        "".join(json.dumps({"text": f"text {i}", "label": v}) + "\n" for i, v in enumerate(labels))
    )
    with pytest.raises(StageError) as error:
        read_rows(path, "text", "label")
    message = str(error.value)
    assert "3 row(s) this pipeline cannot read" in message
    for line, shown in ((3, "1.0"), (4, "true"), (5, "null")):
        assert f"line {line}: the label is {shown}, not a string or a whole number" in message
    path.write_text(
        "".join(json.dumps({"text": f"t {i}", "label": v}) + "\n" for i, v in enumerate(["1", 1, 2]))
    )
    assert read_rows(path, "text", "label").labels == ["1", "1", "2"]
