"""Unit tests of stream.events: decoding, validation reasons, normalization."""

from __future__ import annotations

import json
import math
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.events import (
    Invalid,
    dead_letter_value,
    encode_events,
    event_to_json,
    parse_message,
    split_batch,
    to_seconds,
)
from stream.limits import MIN_TS
from stream.validation import Reject, accept_event, check_event, ts_bounds
from userstream.types import Event

TS = 1_700_000_000


def ev(**over) -> dict:
    base = {"user_id": "u1", "item_id": "i1", "behavior": "view", "ts": TS}
    base.update(over)
    return {k: v for k, v in base.items() if v is not ...}


def one(obj) -> tuple[list[Event], list[Invalid]]:
    return parse_message(json.dumps(obj).encode())


def reason(obj) -> str:
    events, bad = one(obj)
    assert events == [] and len(bad) == 1, (events, bad)
    return bad[0].reason


def test_valid_event_is_normalized():
    events, bad = one(
        ev(
            user_id=42,
            item_id=7,
            behavior="  Add-To_Cart ",
            event_id="e1",
            text="hi",
            props={"a": 1},
        )
    )
    assert bad == []
    assert events == [Event("42", "7", "add-to_cart", float(TS), "e1", "hi", {"a": 1})]


@pytest.mark.parametrize(
    "ts, want",
    [
        (TS, float(TS)),
        (TS + 0.5, TS + 0.5),
        (TS * 1000 + 250, TS + 0.25),  # milliseconds
        (str(TS), float(TS)),
        ("2023-11-14T22:13:20Z", float(TS)),
        ("2023-11-14T23:13:20+01:00", float(TS)),
        ("2023-11-14T22:13:20", float(TS)),  # no offset: UTC
        (0, 0.0),  # parse_message alone has no floor; split_batch (the worker) has
    ],
)
def test_timestamps(ts, want):
    events, bad = one(ev(ts=ts))
    assert bad == []
    assert events[0].ts == pytest.approx(want)


@pytest.mark.parametrize(
    "obj, want",
    [
        (ev(ts=...), "missing field 'ts'"),
        (ev(user_id=...), "missing field 'user_id'"),
        (ev(item_id=...), "missing field 'item_id'"),
        (ev(behavior=...), "missing field 'behavior'"),
        (ev(ts="abc"), "ts 'abc' is not a number or ISO-8601 time"),
        (ev(ts=-5), "ts '-5' is negative"),
        (ev(ts=None), "ts must be a number or an ISO-8601 string, got null"),
        (ev(ts=True), "ts must be a number or an ISO-8601 string, got boolean"),
        (ev(ts="nan"), "ts 'nan' is not finite"),
        (ev(user_id=""), "user_id is empty"),
        (ev(item_id=1.5), "item_id must be a string or integer, got number"),
        (ev(user_id=True), "user_id must be a string or integer, got boolean"),
        (ev(user_id="a" * 257), "user_id is 257 characters long (at most 256)"),
        (ev(item_id="a\tb"), "item_id contains the non-printable character U+0009"),
        (ev(user_id="a\nb"), "user_id contains the non-printable character U+000A"),
        (
            ev(behavior="buy now!"),
            "behavior 'buy now!' is not 1-32 characters of a-z, 0-9, '_' or '-'",
        ),
        (ev(behavior=""), "behavior '' is not 1-32 characters of a-z, 0-9, '_' or '-'"),
        (
            ev(behavior="x" * 33),
            "behavior '" + "x" * 33 + "' is not 1-32 characters of a-z, 0-9, '_' or '-'",
        ),
        (ev(behavior=3), "behavior must be a string, got number"),
        (ev(event_id=5), "event_id must be a string, got number"),
        (ev(text="t" * 1025), "text is 1025 characters long (at most 1024)"),
        (ev(props=[1]), "props must be a JSON object, got array"),
        (ev(color="red", size=3), "unknown field(s) 'color', 'size'"),
        ([1], "event must be a JSON object, got number"),
        ("hello", "event must be a JSON object, got string"),
    ],
)
def test_each_reason(obj, want):
    assert reason(obj) == want


def test_future_ts_rejected_but_near_future_accepted():
    now = time.time()
    assert reason(ev(ts=now + 2 * 86_400)).endswith("is more than one day in the future")
    assert reason(ev(ts=int((now + 2 * 86_400) * 1000))).endswith("more than one day in the future")
    events, bad = one(ev(ts=now + 3600))
    assert bad == [] and events[0].ts == pytest.approx(now + 3600)


def test_behavior_set_is_open():
    events, _ = one(ev(behavior="Share_2"))
    assert events[0].behavior == "share_2"


def test_not_json_keeps_payload():
    raw = b'{"user_id": "u1", oops'
    events, bad = parse_message(raw)
    assert events == [] and len(bad) == 1
    assert bad[0].reason.startswith("message is not valid JSON: ")
    assert bad[0].payload == raw.decode()


def test_bad_utf8_and_empty_messages():
    _, bad = parse_message(b"\xff\xfe{}")
    assert bad[0].reason.startswith("message is not valid UTF-8")
    assert parse_message(None)[1][0].reason == "message has no value"
    assert parse_message(b"[]")[1][0].reason == "message is an empty JSON array"


def test_single_invalid_payload_is_the_original_text():
    raw = '{ "user_id" : "u1",\n "item_id": "i1", "behavior": "view" }'
    _, bad = parse_message(raw.encode())
    assert bad == [Invalid("missing field 'ts'", raw)]


def test_array_mixes_valid_and_invalid_and_keeps_each_elements_text():
    good1 = '{"user_id":"u1","item_id":"a","behavior":"view","ts":1}'
    bad1 = '{"user_id":"u1", "item_id":"b","behavior":"view"}'
    good2 = '{"user_id":"u1","item_id":"c","behavior":"CLICK","ts":2}'
    bad2 = '{"user_id":"u1","item_id":"d","behavior":"no way","ts":3,"nested":[1,{"x":"]"}]}'
    raw = f"[ {good1},\n{bad1} ,{good2},  {bad2}, 7 ]"
    events, bad = parse_message(raw.encode())
    assert [e.item_id for e in events] == ["a", "c"]
    assert events[1].behavior == "click"
    assert [b.payload for b in bad] == [bad1, bad2, "7"]
    assert bad[0].reason == "missing field 'ts'"
    assert bad[1].reason == "unknown field(s) 'nested'"
    assert bad[2].reason == "event must be a JSON object, got number"


def test_split_batch_tags_offsets_and_keys():
    msgs = [
        (0, 10, b"u1", encode_events([ev(item_id="a"), ev(item_id="b")])),
        (1, 3, b"u2", b"nope"),
        (0, 11, b"u1", encode_events([ev(item_id="c"), ev(ts=...)])),
    ]
    events, dead = split_batch(msgs)
    assert [(p, o, e.item_id) for p, o, e in events] == [(0, 10, "a"), (0, 10, "b"), (0, 11, "c")]
    assert [(p, o, k) for p, o, k, _ in dead] == [(1, 3, b"u2"), (0, 11, b"u1")]
    assert dead[1][3].reason == "missing field 'ts'"
    record = json.loads(dead_letter_value(dead[0][3], "topic", 1, 3, 123.0))
    assert record["payload"] == "nope" and record["offset"] == 3 and record["topic"] == "topic"
    assert record["reason"].startswith("message is not valid JSON")
    assert (record["payload_bytes"], record["truncated"]) == (4, False)


def test_split_batch_rejects_times_before_the_live_floor():
    old = [(0, 0, None, json.dumps(ev(ts=t)).encode()) for t in (0, 5, 788_918_399)]
    events, dead = split_batch(old)
    assert events == [] and [d[3].reason for d in dead] == [
        "ts '0' is before 1995-01-01T00:00:00Z",
        "ts '5' is before 1995-01-01T00:00:00Z",
        "ts '788918399' is before 1995-01-01T00:00:00Z",
    ]
    events, dead = split_batch([(0, 1, None, json.dumps(ev(ts=788_918_400)).encode())])
    assert dead == [] and events[0][2].ts == 788_918_400.0


def test_encoding_round_trip():
    e = Event("u1", "i1", "view", 12.5, None, "q", {"k": "v"})
    assert json.loads(event_to_json(e)) == {
        "user_id": "u1",
        "item_id": "i1",
        "behavior": "view",
        "ts": 12.5,
        "text": "q",
        "props": {"k": "v"},
    }
    assert parse_message(encode_events([e]))[0] == [e]
    assert parse_message(encode_events([e, e]))[0] == [e, e]
    with pytest.raises(ValueError, match="not a number"):
        to_seconds("yesterday")


# --- the fast path (stream.validation.accept_event) agrees with the full checks ---------

_NEAR_IDS = st.one_of(
    st.text(min_size=0, max_size=4),
    st.sampled_from(["u1", " ", "\t", "a\x00b", "x" * 256, "x" * 257, "\u2028", "é"]),
    st.integers(-5, 10**5),
    st.booleans(),
    st.none(),
)
_NEAR_TS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(10**18), 10**18),
    st.sampled_from([0, -0.0, 1e11, 1e11 + 1, MIN_TS, MIN_TS - 1e-3, True, "1700000000", None]),
    st.floats(TS - 10, TS + 10),
)
_NEAR_BEHAVIORS = st.sampled_from(["view", "View", " click ", "", "x" * 33, 5, None, ["view"]])
NEAR_EVENTS = st.dictionaries(
    st.sampled_from(["user_id", "item_id", "behavior", "ts", "event_id", "extra"]),
    st.one_of(_NEAR_IDS, _NEAR_TS, _NEAR_BEHAVIORS),
    max_size=5,
) | st.fixed_dictionaries(
    {"user_id": _NEAR_IDS, "item_id": _NEAR_IDS, "behavior": _NEAR_BEHAVIORS, "ts": _NEAR_TS}
)


@given(
    obj=NEAR_EVENTS,
    now=st.sampled_from([TS + 100.0, math.inf]),
    floor=st.sampled_from([0.0, MIN_TS]),
)
@settings(max_examples=600, deadline=None)
def test_fast_path_accepts_only_what_the_full_checks_accept(obj, now, floor):
    for name in ("View", " click "):  # a behavior seen before is the fast path's case
        check_event({**ev(), "behavior": name}, TS + 100.0)
    fast = accept_event(obj, *ts_bounds(now, floor))
    try:
        full = check_event(obj, now, floor)
    except Reject:
        full = None
    assert fast is None or fast == full, (obj, fast, full)
    if fast is not None:
        assert type(fast.ts) is float and fast.event_id is None and fast.props is None


def test_fast_path_takes_the_usual_event_and_split_batch_agrees():
    obj = ev(behavior="view", ts=TS * 1000)
    assert accept_event(obj, *ts_bounds(TS + 100.0, MIN_TS)) == check_event(obj, TS + 100.0)
    raw = json.dumps([ev(item_id=f"i{k}", ts=TS + k) for k in range(50)]).encode()
    fast, dead = split_batch([(0, 7, b"u1", raw)], now=TS + 100.0)
    assert dead == [] and [e.item_id for _, _, e in fast] == [f"i{k}" for k in range(50)]
    # one bad element sends the message down the full path: the others still apply
    mixed = json.dumps([ev(item_id="a"), ev(ts="soon"), ev(item_id="c")]).encode()
    events, dead = split_batch([(0, 8, b"u1", mixed)], now=TS + 100.0)
    assert [e.item_id for _, _, e in events] == ["a", "c"] and len(dead) == 1
    assert dead[0][3].reason == "ts 'soon' is not a number or ISO-8601 time"
