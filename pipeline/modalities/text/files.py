"""Labelled texts on disk: CSV, TSV or JSON Lines files, read and checked.

``data.path`` is one file (split stratified by prepare) or a folder holding a train file
and, where the user has them, val and test files (``train.csv``, ``val.tsv``,
``test.jsonl``, ...; ``valid``, ``validation`` and ``dev`` name a val file too), and
optionally ``labels.txt``, one class name per line, which fixes the classes and their
order. Every problem a user can fix is a StageError that names the file and the line: a
missing column (with the columns found), bytes that are not UTF-8, a row with the wrong
number of fields, a line that is not a JSON object, an empty label, an empty or
whitespace-only text (or, with ``data.skip_bad_texts``, a skipped one), a label the
classes do not have.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.errors import StageError

# A CSV field may hold a whole article: the csv module's default cap is 131,072 characters.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))

FORMATS = {".csv": ",", ".tsv": "\t", ".jsonl": None}  # a separator, or None for JSON Lines
SPLIT_STEMS = {"train": ("train",), "val": ("val", "valid", "validation", "dev"), "test": ("test",)}
LABELS_FILE = "labels.txt"
SHOWN = 10  # problems listed by line in one error; the rest are counted


@dataclass
class Rows:
    """A file's texts, their labels (as written) and where each came from (file:line)."""

    texts: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)


def decoded(path: Path) -> str:
    """The file as text: UTF-8 (a byte-order mark is dropped), or an error naming the line
    that holds the first byte that is not."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise StageError(
            f"{path}: line {line}: not UTF-8 text (byte 0x{data[error.start]:02x}); "
            "save the file as UTF-8 (for example: iconv -f latin1 -t utf-8)"
        ) from None


def missing_columns(path: Path, found: list[str], wanted: dict[str, str], where: str = "") -> None:
    """An error naming the columns ``wanted`` (by the key that names each) that are not
    among those ``found``."""
    absent = [f"{key}: {name!r}" for key, name in wanted.items() if name not in found]
    if absent:
        raise StageError(
            f"{path}{where}: no column {', '.join(absent)}; the columns found are: "
            f"{', '.join(map(repr, found)) or 'none'}; set {' and '.join(wanted)}"
        )


def lines_of(content: str) -> list[str]:
    """A file's lines, split at line ends only (\\n, with any \\r before it): not at the
    other breaks str.splitlines() knows (U+2028, U+0085, form feed), which JSON strings and
    texts may hold."""
    return [line.removesuffix("\r") for line in content.removesuffix("\n").split("\n")] if content else []


@dataclass(frozen=True)
class Record:
    """One row of a file: its line, text and label (empty where no label column was asked
    for), or the problem that keeps it from being read."""

    line: int
    text: str = ""
    label: str = ""
    problem: str = ""


def records(
    path: Path, text_column: str, label_column: str | None = None, text_key: str = "data.text_column"
) -> list[Record]:
    """Every row of a CSV, TSV or JSON Lines file, with its line number and any problem
    with it. A missing column is an error for the whole file that names the column by the
    key that sets it (``text_key``; ``data.label_column``)."""
    separator = FORMATS.get(path.suffix.lower(), "unknown")
    if separator == "unknown":
        raise StageError(f"{path}: not a format for texts; use .csv, .tsv or .jsonl ({', '.join(FORMATS)})")
    wanted = {text_key: text_column}
    if label_column is not None:
        wanted["data.label_column"] = label_column
    if separator is None:
        return _json_lines(path, decoded(path), wanted)
    return _delimited(path, decoded(path), separator, wanted)


def read_rows(path: Path, text_column: str, label_column: str) -> Rows:
    """A file's labelled texts; a row that cannot be read (wrong number of fields, not a
    JSON object, an empty label) is an error that lists every such row by line."""
    rows, problems = Rows(), []
    for record in records(path, text_column, label_column):
        if not record.problem and not record.label.strip():
            record = Record(record.line, problem="an empty label")
        if record.problem:
            problems.append(f"line {record.line}: {record.problem}")
            continue
        rows.texts.append(record.text)
        rows.labels.append(record.label.strip())
        rows.sources.append(f"{path}:{record.line}")
    refuse(path, problems)
    return rows


def _delimited(path: Path, content: str, separator: str, wanted: dict[str, str]) -> list[Record]:
    reader = csv.reader(io.StringIO(content, newline=""), delimiter=separator)
    try:
        header = next(reader)
    except StopIteration:
        raise StageError(f"{path}: empty; it needs a header row naming its columns") from None
    missing_columns(path, header, wanted)
    at = [header.index(name) for name in wanted.values()]
    found = []
    try:
        for fields in reader:
            if not fields:  # a blank line
                continue
            if len(fields) != len(header):
                problem = f"{len(fields)} fields, the header has {len(header)}"
                found.append(Record(reader.line_num, problem=problem))
                continue
            found.append(Record(reader.line_num, *(fields[index] for index in at)))
    except csv.Error as error:
        kind = path.suffix[1:].upper()
        raise StageError(f"{path}: line {reader.line_num}: not valid {kind}: {error}") from None
    return found


def _json_lines(path: Path, content: str, wanted: dict[str, str]) -> list[Record]:
    found = []
    for number, line in enumerate(lines_of(content), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            found.append(Record(number, problem=f"not JSON ({error.msg})"))
            continue
        if not isinstance(record, dict):
            found.append(Record(number, problem=f"a JSON {type(record).__name__}, not an object"))
            continue
        missing_columns(path, list(record), wanted, where=f": line {number}")
        values = [record[name] for name in wanted.values()]
        if not isinstance(values[0], str):
            found.append(Record(number, problem=f"the text is {json.dumps(values[0])}, not a string"))
            continue
        if len(values) > 1 and not is_label(values[1]):
            found.append(
                Record(
                    number, problem=f"the label is {json.dumps(values[1])}, not a string or a whole number"
                )
            )
            continue
        found.append(Record(number, *(str(value) for value in values)))
    return found


def is_label(value: object) -> bool:
    """A JSON label names its class as a string or a whole number (0 and "0" are one class);
    1.0 and true would each name another class than 1, null none."""
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def refuse(path: Path, problems: list[str]) -> None:
    """One error listing a file's problems by line (the first SHOWN, and how many more)."""
    if problems:
        more = f"\n  ... and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
        raise StageError(
            f"{path}: {len(problems)} row(s) this pipeline cannot read:\n  "
            + "\n  ".join(problems[:SHOWN])
            + more
        )


def data_files(root: Path) -> dict[str, Path]:
    """The files of ``data.path``: {"all": file} for one file, else a folder's train file
    and the val and test files it has."""
    if root.is_file():
        return {"all": root}
    if not root.is_dir():
        raise StageError(f"data.path: {root} is neither a file nor a folder of labelled texts")
    found = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in FORMATS)
    files = {}
    for split, stems in SPLIT_STEMS.items():
        matches = [p for p in found if p.stem.lower() in stems]
        if len(matches) > 1:
            raise StageError(
                f"data.path: {root} has {len(matches)} {split} files "
                f"({', '.join(map(str, matches))}); keep one"
            )
        if matches:
            files[split] = matches[0]
    if "train" in files:
        return files
    if len(found) == 1 and not files:
        return {"all": found[0]}
    raise StageError(
        f"data.path: {root} holds no train file; put your labelled texts in train.csv (or .tsv, "
        f".jsonl), with val and test files if you have them, or point data.path at one file "
        f"(found: {', '.join(p.name for p in found) or 'no .csv, .tsv or .jsonl file'})"
    )


def read_labels_file(path: Path) -> list[str]:
    """labels.txt: one class name per line, in label order; blank lines are skipped."""
    names = [line.strip() for line in lines_of(decoded(path)) if line.strip()]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise StageError(f"{path}: names a class more than once: {', '.join(repeated)}")
    return names


def natural_order(labels: set[str]) -> list[str]:
    """Class names in numeric order where every name is a number (2 before 10), else sorted."""
    if all(label.lstrip("-").isdigit() for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)
