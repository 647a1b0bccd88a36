"""stream.datasets readers: tiny hand-written files, then the real data sets when present."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from stream.datasets import FORMATS, read_dataset
from stream.events import parse_message
from tests.conftest import shared_data


def keys_of(ds, *fields):
    return [tuple(ev[f] for f in fields) for ev in ds]


def test_amazon_seq_interleaves_round_robin_and_keeps_user_order(tmp_path):
    path = tmp_path / "seq.txt"
    path.write_text("1 a b c\n2 x\n3 p q\n\n")
    ds = read_dataset(path, "amazon-seq")
    assert ds.count == 6
    assert keys_of(ds, "user_id", "item_id") == [
        ("1", "a"), ("2", "x"), ("3", "p"), ("1", "b"), ("3", "q"), ("1", "c"),
    ]  # fmt: skip
    ts = [ev["ts"] for ev in ds]
    assert ts == sorted(ts) and len(set(ts)) == len(ts)
    assert {ev["behavior"] for ev in ds} == {"purchase"}


def test_movielens_sorts_by_time_ties_keep_file_order(tmp_path):
    path = tmp_path / "x.inter"
    path.write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        "1\t10\t4\t300\n"
        "2\t20\t5\t100\n"
        "1\t11\t3\t200\n"
        "3\t30\t1\t100\n"
    )
    ds = read_dataset(path, "movielens")
    assert keys_of(ds, "user_id", "item_id", "ts") == [
        ("2", "20", 100.0), ("3", "30", 100.0), ("1", "11", 200.0), ("1", "10", 300.0),
    ]  # fmt: skip
    assert ds.events[0]["behavior"] == "rate" and ds.events[0]["props"] == {"rating": 5.0}


def test_taobao_maps_behaviors_and_keeps_category(tmp_path):
    path = tmp_path / "ub.csv"
    path.write_text("1,100,7,pv,50\n1,101,7,buy,40\n2,102,8,cart,40\n2,103,8,fav,60\n")
    ds = read_dataset(path, "taobao")
    assert keys_of(ds, "item_id", "behavior") == [
        ("101", "purchase"), ("102", "cart"), ("100", "view"), ("103", "fav"),
    ]  # fmt: skip
    assert ds.events[0]["props"] == {"category_id": "7"}


def test_jsonl_passes_through_and_sorts_mixed_time_forms(tmp_path):
    rows = [
        {"user_id": "a", "item_id": "1", "behavior": "view", "ts": 1_700_000_002_000},  # ms
        {"user_id": "b", "item_id": "2", "behavior": "click", "ts": "2023-11-14T22:13:21Z"},
        {"user_id": "c", "item_id": "3", "behavior": "view", "ts": 1_700_000_000, "extra": 1},
        {"user_id": "d", "item_id": "4", "behavior": "view", "ts": "soon"},
    ]
    path = tmp_path / "e.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ds = read_dataset(path, "jsonl")
    assert [ev["user_id"] for ev in ds] == ["c", "b", "a", "d"]  # unreadable ts last
    assert ds.events[0] == rows[2]  # unchanged: validation is the worker's job


def test_csv_extra_columns_become_props(tmp_path):
    path = tmp_path / "e.csv"
    path.write_text(
        "ts,user_id,item_id,behavior,text,price\n"
        "20,u1,i1,search,red shoes,\n"
        "10,u2,i2,view,,9.5\n"
        "2023-11-14T22:13:20Z,u3,i3,view,,\n"
    )
    ds = read_dataset(path, "csv")
    assert keys_of(ds, "user_id") == [("u2",), ("u1",), ("u3",)]
    assert ds.events[0] == {
        "user_id": "u2",
        "item_id": "i2",
        "behavior": "view",
        "ts": 10.0,
        "props": {"price": "9.5"},
    }
    assert ds.events[1]["text"] == "red shoes" and "props" not in ds.events[1]
    events, bad = parse_message(json.dumps(ds.events[2]).encode())
    assert bad == [] and events[0].ts == 1_700_000_000.0


def test_unknown_format_and_bad_header(tmp_path):
    with pytest.raises(ValueError, match="unknown format 'parquet'"):
        read_dataset(tmp_path / "x", "parquet")
    path = tmp_path / "e.csv"
    path.write_text("user,item\n1,2\n")
    with pytest.raises(ValueError, match="header lacks"):
        read_dataset(path, "csv")
    assert set(FORMATS) == {"amazon-seq", "movielens", "taobao", "jsonl", "csv"}


# --- real data (skipped with a reason where ../shared/data is absent) --------------


def _sorted(ds) -> bool:
    ts = [ev["ts"] for ev in ds]
    return all(a <= b for a, b in zip(ts, ts[1:], strict=False))


@pytest.mark.data
def test_movielens_100k():
    ds = read_dataset(shared_data("ml-100k", "ml-100k.inter"), "movielens")
    assert ds.count == 100_000 and _sorted(ds)
    assert len({ev["user_id"] for ev in ds}) == 943
    assert len({ev["item_id"] for ev in ds}) == 1682


@pytest.mark.data
def test_taobao_sample():
    ds = read_dataset(shared_data("taobao-sample", "UserBehavior.csv"), "taobao")
    assert ds.count == 4321 and _sorted(ds)
    kinds = Counter(ev["behavior"] for ev in ds)
    assert set(kinds) <= {"view", "cart", "fav", "purchase"} and kinds["view"] > kinds["purchase"]
    assert len({ev["user_id"] for ev in ds}) == 43


@pytest.mark.data
def test_beauty():
    path = shared_data("beauty", "Beauty.txt")
    ds = read_dataset(path, "amazon-seq")
    assert ds.count == 198_502 and _sorted(ds)
    assert len({ev["user_id"] for ev in ds}) == 22_363
    # each user's order is the file's order
    first = path.read_text().split("\n", 1)[0].split()
    assert [ev["item_id"] for ev in ds if ev["user_id"] == first[0]] == first[1:]
