"""Hostile messages at the stream worker's door: each one is a dead letter, nothing stops ingestion.

A message is redelivered until its batch is applied, so a message that makes
decoding raise (or whose dead letter the producer refuses) used to stop its
partition for good: the worker exited with code 70 on every restart. The
cases below are those reported plus the limits of ``stream.events``; the
property tests run ``split_batch`` over the event grammar and over byte-level
mutations of valid messages. The strategies are shared with
``benchmarks/fuzz_ingest.py``.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from datetime import datetime, timezone

import pytest
from aiokafka import AIOKafkaProducer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream.events import (
    DEAD_LETTER_MAX_BYTES,
    MAX_DEPTH,
    MAX_EVENTS_PER_MESSAGE,
    MAX_MESSAGE_BYTES,
    MIN_TS,
    Invalid,
    dead_letter_value,
    parse_message,
    split_batch,
    to_seconds,
    validate_event,
)

NOW = time.time()
TS = 1_700_000_000


def ev(**over) -> dict:
    base = {"user_id": "u1", "item_id": "i1", "behavior": "view", "ts": TS}
    base.update(over)
    return {k: v for k, v in base.items() if v is not ...}


def nested(levels: int) -> list:
    """``levels`` arrays, one inside the other."""
    value: list = []
    for _ in range(levels - 1):
        value = [value]
    return value


def _poison() -> dict[str, bytes]:
    head = b'{"user_id": "u1", "item_id": "i1", "behavior": "view", "ts": '
    return {
        # the three reported poison messages
        "nested_2kb": head + b'1700000000, "props": {"a": ' + b"[" * 1000 + b"]" * 1000 + b"}}",
        "ts_400_digits": head + b"9" * 400 + b"}",
        # quotes double when the payload is escaped into the dead letter
        "invalid_1mb": json.dumps(ev(text='"' * 450_000)).encode(),
        # the validation gaps
        "id_1000_digits": json.dumps(ev(user_id=int("7" * 1000))).encode(),
        "whitespace_id": json.dumps(ev(item_id="   ")).encode(),
        "ts_zero": json.dumps(ev(ts=0)).encode(),
        # the other limits
        "too_large": json.dumps(ev(text="x" * MAX_MESSAGE_BYTES)).encode(),
        "too_many_events": json.dumps([ev()] * (MAX_EVENTS_PER_MESSAGE + 1)).encode(),
        "props_depth_40": json.dumps(ev(props={"a": nested(40)})).encode(),
        "int_5000_digits": head + b"1" * 5000 + b"}",
        "not_utf8": b'{"user_id": "\xff\xfe", "item_id": "i1"}',
        "not_json": b'{"user_id": "u1", ',
        "lone_surrogate": json.dumps(ev(behavior="\ud800")).encode(),
        "ts_1e999": head + b"1e999}",
        "ts_year_1": json.dumps(ev(ts="0001-01-01T00:00:00+23:00")).encode(),
    }


POISON = _poison()


def dead_letter_ok(inv: Invalid, limit: int = DEAD_LETTER_MAX_BYTES) -> dict:
    """The dead-letter record of ``inv``: strict UTF-8 JSON, within ``limit``."""
    value = dead_letter_value(inv, "events", 1, 42, 1.5, limit)
    assert len(value) <= limit
    record = json.loads(value.decode("utf-8"))
    assert record["reason"] and record["offset"] == 42 and record["topic"] == "events"
    assert record["payload_bytes"] >= 0 and isinstance(record["truncated"], bool)
    return record


def only_dead(raw: bytes) -> Invalid:
    events, dead = split_batch([(0, 0, b"k", raw)])
    assert events == [] and len(dead) == 1, (events, dead)
    return dead[0][3]


# --- the reported cases ------------------------------------------------------
def test_nested_json_of_2kb_is_a_dead_letter():
    raw = POISON["nested_2kb"]
    assert len(raw) < 2200
    inv = only_dead(raw)
    assert inv.reason.startswith("message nests arrays or objects too deep")
    assert inv.payload == raw.decode()


def test_props_nest_at_most_max_depth():
    # the event is level 1 and props level 2: props may hold MAX_DEPTH - 2 more levels
    ok = json.dumps(ev(props={"a": nested(MAX_DEPTH - 2)})).encode()
    assert parse_message(ok)[1] == []
    deep = json.dumps(ev(props={"a": nested(MAX_DEPTH - 1)})).encode()
    assert parse_message(deep)[1][0].reason == "props nest deeper than 32 levels (the event is 1)"
    assert only_dead(POISON["props_depth_40"]).reason.startswith("props nest deeper")


def test_ts_of_400_digits_is_out_of_range():
    assert only_dead(POISON["ts_400_digits"]).reason.endswith("... is out of range")
    assert only_dead(POISON["ts_1e999"]).reason == "ts 'Infinity' is not finite"
    assert only_dead(json.dumps(ev(ts="9" * 400)).encode()).reason.endswith("is not finite")
    assert only_dead(POISON["ts_year_1"]).reason.endswith("is negative")
    with pytest.raises(ValueError, match="out of range"):
        to_seconds(10**400)


def test_integer_ids_obey_the_length_limit():
    inv = only_dead(POISON["id_1000_digits"])
    assert inv.reason == "user_id is an integer of more than 256 digits"
    events, _ = parse_message(json.dumps(ev(user_id=int("9" * 256))).encode())
    assert events[0].user_id == "9" * 256
    inv = only_dead(json.dumps(ev(item_id=-int("9" * 256))).encode())
    assert inv.reason == "item_id is 257 characters long (at most 256)"
    with pytest.raises(ValueError, match="event_id is 257 characters"):
        validate_event(ev(event_id="e" * 257))


def test_whitespace_only_ids_are_rejected_and_others_kept_as_given():
    assert only_dead(POISON["whitespace_id"]).reason == "item_id is only whitespace"
    assert only_dead(json.dumps(ev(user_id=" ")).encode()).reason == "user_id is only whitespace"
    events, _ = parse_message(json.dumps(ev(user_id=" u1 ")).encode())
    assert events[0].user_id == " u1 "  # not stripped


def test_ts_floor_applies_to_the_live_stream_only():
    assert only_dead(POISON["ts_zero"]).reason == "ts '0' is before 1995-01-01T00:00:00Z"
    with pytest.raises(ValueError, match="before 1995"):
        validate_event(ev(ts=1000.0))
    # history: replays, planted streams, dataset readers
    assert validate_event(ev(ts=1.0), now=math.inf).ts == 1.0
    assert to_seconds(0) == 0.0
    movielens = ev(user_id="259", item_id="255", behavior="rate", ts=874724710.0)
    assert split_batch([(0, 0, None, json.dumps(movielens).encode())])[1] == []
    assert validate_event(ev(ts=MIN_TS)).ts == MIN_TS


def test_invalid_event_of_1mb_gives_a_truncated_dead_letter_with_its_size():
    raw = POISON["invalid_1mb"]
    assert 900_000 < len(raw) < MAX_MESSAGE_BYTES
    inv = only_dead(raw)
    assert inv.reason == "text is 450000 characters long (at most 1024)"
    record = dead_letter_ok(inv)
    assert record["truncated"] is True and record["payload_bytes"] == len(raw)
    assert raw.decode().startswith(record["payload"]) and len(record["payload"]) > 100_000
    assert (record["partition"], record["offset"]) == (1, 42)
    # a small one is whole
    small = dead_letter_ok(only_dead(POISON["ts_zero"]))
    assert small["truncated"] is False and small["payload"] == POISON["ts_zero"].decode()


def test_message_over_the_size_limit_is_not_decoded():
    raw = POISON["too_large"]
    inv = only_dead(raw)
    assert inv.reason == f"message is {len(raw)} bytes (at most {MAX_MESSAGE_BYTES})"
    assert inv.truncated and inv.payload_bytes == len(raw)
    assert len(inv.payload) == DEAD_LETTER_MAX_BYTES
    record = dead_letter_ok(inv)
    assert record["payload_bytes"] == len(raw) and record["truncated"] is True


def test_array_with_a_poison_element_keeps_the_valid_ones():
    good = [ev(item_id="a"), ev(item_id="b"), ev(item_id="c")]
    poison = '{"user_id": "u1", "item_id": "x", "behavior": "view", "ts": ' + "9" * 400 + "}"
    deep = json.dumps(ev(item_id="y", props={"a": nested(60)}))
    parts = [json.dumps(good[0]), poison, json.dumps(good[1]), deep, json.dumps(good[2])]
    events, dead = split_batch([(0, 7, b"u1", ("[" + ", ".join(parts) + "]").encode())])
    assert [(o, e.item_id) for _, o, e in events] == [(7, "a"), (7, "b"), (7, "c")]
    assert [d[3].payload for d in dead] == [poison, deep]
    assert dead[0][3].reason.endswith("is out of range")
    assert dead[1][3].reason.startswith("props nest deeper")


def test_other_limits_and_undecodable_messages():
    inv = only_dead(POISON["too_many_events"])
    assert inv.reason == f"message holds {MAX_EVENTS_PER_MESSAGE + 1} events (at most 10000)"
    assert only_dead(POISON["int_5000_digits"]).reason == (
        "message holds an integer of more than 4300 digits"
    )
    inv = only_dead(POISON["not_utf8"])
    assert inv.reason.startswith("message is not valid UTF-8") and "\ufffd" in inv.payload
    assert dead_letter_ok(inv)["payload_bytes"] == len(POISON["not_utf8"])
    assert only_dead(POISON["not_json"]).reason.startswith("message is not valid JSON")
    assert only_dead(12345).reason == "message value is int, not bytes"
    # a lone surrogate reaches the reason through repr(), and dead letters stay UTF-8 JSON
    inv = only_dead(POISON["lone_surrogate"])
    assert "\\ud800" in inv.reason
    record = dead_letter_ok(Invalid("bad \ud800 reason", 'x"\ud800\\'))
    assert (record["reason"], record["payload"]) == ("bad \ud800 reason", 'x"\ud800\\')


def test_every_poison_case_is_one_dead_letter_with_a_valid_record():
    records = [(0, i, b"k", raw) for i, raw in enumerate(POISON.values())]
    events, dead = split_batch(records)
    assert events == []
    assert [d[1] for d in dead] == list(range(len(POISON)))
    for d in dead:
        dead_letter_ok(d[3])


# --- the grammar (shared with benchmarks/fuzz_ingest.py) ---------------------
_ID_CHARS = st.characters(categories=("L", "N", "P", "S"), include_characters=" ")
VALID_IDS = st.one_of(
    st.text(_ID_CHARS, min_size=1, max_size=24).filter(lambda s: not s.isspace()),
    st.integers(-(10**30), 10**30),
)
_LO, _HI = MIN_TS + 86_400, NOW - 3_600  # clear of both bounds, however long a run takes
VALID_TS = st.one_of(
    st.floats(_LO, _HI),
    st.integers(int(_LO * 1000), int(_HI * 1000)),  # milliseconds
    st.floats(_LO, _HI).map(repr),
    st.integers(int(_LO), int(_HI)).map(
        lambda s: datetime.fromtimestamp(s, timezone.utc).isoformat()
    ),
)
_BEHAVIORS = st.from_regex(r"[A-Za-z0-9_\-]{1,32}", fullmatch=True)
_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=12)
)
_JSON = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
VALID_EVENTS = st.fixed_dictionaries(
    {"user_id": VALID_IDS, "item_id": VALID_IDS, "behavior": _BEHAVIORS, "ts": VALID_TS},
    optional={
        "event_id": st.text(max_size=40),
        "text": st.text(max_size=80),
        "props": st.dictionaries(st.text(max_size=8), _JSON, max_size=4),
    },
)
_BAD_IDS = st.one_of(
    st.sampled_from(["", " ", "   ", "a\tb", "a\nb", "x" * 257, True, None, 1.5, [], {}]),
    st.integers(min_value=10**256, max_value=10**1000),
)
_BAD = {  # field -> values that make an otherwise valid event invalid
    "user_id": _BAD_IDS,
    "item_id": _BAD_IDS,
    "behavior": st.sampled_from(["", "buy now!", "x" * 33, 3, None, "\ud800"]),
    "ts": st.one_of(
        st.sampled_from([0, -5, 1e8, 10**400, "nan", "Infinity", None, True, "yesterday", []]),
        st.sampled_from([math.nan, math.inf, "0001-01-01T00:00:00+23:00", "9" * 400]),
        st.floats(NOW + 3 * 86_400, 9e10),  # the future
        st.integers(1, int(MIN_TS) - 1),  # before the floor
    ),
    "text": st.one_of(st.text(min_size=1025, max_size=1100), st.integers()),
    "event_id": st.one_of(st.integers(), st.text(min_size=257, max_size=300)),
    "props": st.sampled_from([[1], "p", 3, {"a": nested(MAX_DEPTH)}, {"a": nested(200)}]),
}


@st.composite
def invalid_events(draw) -> dict:
    """A valid event with exactly one defect."""
    event = dict(draw(VALID_EVENTS))
    how = draw(st.sampled_from(["value", "missing", "unknown"]))
    if how == "missing":
        del event[draw(st.sampled_from(["user_id", "item_id", "behavior", "ts"]))]
    elif how == "unknown":
        event[draw(st.sampled_from(["colour", "", "User_id", "\x00", "x" * 100]))] = 1
    else:
        field = draw(st.sampled_from(sorted(_BAD)))
        event[field] = draw(_BAD[field])
    return event


LABELLED_EVENTS = st.one_of(
    VALID_EVENTS.map(lambda e: (e, True)), invalid_events().map(lambda e: (e, False))
)


@st.composite
def labelled_messages(draw) -> tuple[bytes, int, int]:
    """(message value, valid events in it, invalid events in it)."""
    if draw(st.booleans()):
        labelled = [draw(LABELLED_EVENTS)]
        doc = labelled[0][0]
    else:
        labelled = draw(st.lists(LABELLED_EVENTS, min_size=1, max_size=6))
        doc = [e for e, _ in labelled]
    text = json.dumps(
        doc,
        ensure_ascii=draw(st.booleans()),
        indent=draw(st.sampled_from([None, None, 1])),
        separators=draw(st.sampled_from([None, (",", ":")])),
    )
    n_valid = sum(ok for _, ok in labelled)
    # a lone surrogate becomes its JSON escape again: the same text, valid UTF-8
    return text.encode("utf-8", "backslashreplace"), n_valid, len(labelled) - n_valid


_TOKENS = [b"[", b"{", b"]", b"}", b",", b":", b'"', b"\\", b"\x00", b"\xff", b"\xc3",
           b"NaN", b"-Infinity", b"1e999", b"9" * 400, b'"\\ud800"', b"true", b"null",
           b"[" * 100, b'{"a":' * 40, b" " * 10, b"\xef\xbb\xbf"]  # fmt: skip


@st.composite
def mutated_messages(draw) -> bytes:
    """A labelled message with a few byte-level edits (its label no longer holds)."""
    raw = bytearray(draw(labelled_messages())[0])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "delete", "insert", "truncate", "repeat", "byte"]))
        pos = draw(st.integers(0, len(raw)))
        span = draw(st.integers(1, 16))
        if op == "flip" and pos < len(raw):
            raw[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "delete":
            del raw[pos : pos + span]
        elif op == "insert":
            raw[pos:pos] = draw(st.sampled_from(_TOKENS))
        elif op == "truncate":
            del raw[pos:]
        elif op == "repeat":
            raw[pos:pos] = raw[pos : pos + span] * draw(st.integers(2, 50))
        elif op == "byte" and pos < len(raw):
            raw[pos] = draw(st.integers(0, 255))
    return bytes(raw)


def expected_outputs(raw) -> int:
    """How many events + dead letters one message must give, decoded independently."""
    if not isinstance(raw, (bytes, str)) or len(raw) > MAX_MESSAGE_BYTES:
        return 1
    try:
        doc = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    except Exception:
        return 1
    if isinstance(doc, list) and 0 < len(doc) <= MAX_EVENTS_PER_MESSAGE:
        return len(doc)
    return 1


def check_batch(messages: list) -> tuple[int, int]:
    """``split_batch`` over ``messages`` (one offset each): every one accounted for,
    every dead-letter record valid; returns (events, dead letters)."""
    events, dead = split_batch([(0, i, b"k", raw) for i, raw in enumerate(messages)])
    out = [0] * len(messages)
    for _, offset, _ in events:
        out[offset] += 1
    for _, offset, _, inv in dead:
        out[offset] += 1
        dead_letter_ok(inv)
    assert out == [expected_outputs(raw) for raw in messages]
    return len(events), len(dead)


_FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,  # nothing written to the working tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@_FUZZ
@given(st.lists(labelled_messages(), min_size=1, max_size=4))
def test_fuzz_grammar_counts_are_exact(batch):
    events, dead = check_batch([raw for raw, _, _ in batch])
    assert (events, dead) == (sum(b[1] for b in batch), sum(b[2] for b in batch))


@_FUZZ
@given(st.lists(st.one_of(mutated_messages(), st.binary(max_size=64)), min_size=1, max_size=4))
def test_fuzz_mutated_bytes_never_raise(batch):
    check_batch(batch)


_PAYLOAD_CHARS = st.characters(categories=("L", "N", "P", "S", "Zs", "Cc", "Cs"))


@_FUZZ
@given(
    st.text(_PAYLOAD_CHARS, min_size=1, max_size=40),
    st.integers(1, 20_000),
    st.integers(4096, 200_000),
)
def test_fuzz_dead_letters_stay_within_the_limit(chunk, repeat, limit):
    payload = chunk * repeat  # escapes, multi-byte characters, lone surrogates, up to ~1 MB
    record = dead_letter_ok(Invalid("why", payload), limit)
    assert payload.startswith(record["payload"])
    assert record["truncated"] == (record["payload"] != payload)


# --- the real stream worker ---------------------------------------------------
@pytest.mark.integration
@pytest.mark.slow
def test_worker_dead_letters_poison_and_applies_every_valid_event(
    tmp_path, broker, redis_url, redis_prefix, redis_client, keys
):
    from stream.topics import read_topic_async
    from tests.helpers import stream_settings, wait_until
    from tests.test_stream_worker import Worker, wait_ready
    from userstream.stores import RedisSequenceStore

    s = stream_settings(tmp_path, broker, redis_url, redis_prefix)
    now = time.time()

    def valid(item: str, i: int) -> dict:
        return ev(user_id="p1", item_id=item, ts=round(now - 600 + i, 3))

    before = [valid(f"b{i}", i) for i in range(4)]
    after = [valid(f"a{i}", 100 + i) for i in range(4)]
    in_array = [valid("m0", 50), valid("m1", 51)]
    element = '{"user_id": "p1", "item_id": "mx", "behavior": "view", "ts": ' + "9" * 400 + "}"
    array = f"[{json.dumps(in_array[0])}, {element}, {json.dumps(in_array[1])}]".encode()
    poison = ["nested_2kb", "ts_400_digits", "invalid_1mb", "id_1000_digits", "whitespace_id",
              "ts_zero"]  # fmt: skip
    values = [json.dumps(e).encode() for e in before]
    values += [POISON[name] for name in poison] + [array]
    values += [json.dumps(e).encode() for e in after]

    async def send() -> list[int]:
        producer = AIOKafkaProducer(bootstrap_servers=broker)
        await producer.start()
        try:  # one key: every message on one partition, in this order
            return [
                (await producer.send_and_wait(s.events_topic, value=v, key=b"p1")).offset
                for v in values
            ]
        finally:
            await producer.stop()

    store = RedisSequenceStore(redis_client, keys, s.sequence_length)
    w = Worker(s, tmp_path / "worker.log")
    try:
        wait_ready(w, redis_client, s)
        offsets = asyncio.run(send())
        want = (len(before) + len(in_array) + len(after), len(poison) + 1)

        def counted():
            c = store.counters()
            return (c["events_ingested"], c["events_dead_lettered"]) == want

        try:
            wait_until(counted, 90, f"{want} ingested and dead-lettered", proc=w.proc)
        except AssertionError:
            print(store.counters(), w.tail(), sep="\n")
            raise
        assert w.proc.poll() is None
        items = [b.item_id for b in store.read_many(["p1"])[0]]
        assert items == ["b0", "b1", "b2", "b3", "m0", "m1", "a0", "a1", "a2", "a3"]

        dlq = asyncio.run(read_topic_async(broker, s.dlq_topic, min_messages=want[1]))
        assert len(dlq) == want[1] and all(len(m.value) <= DEAD_LETTER_MAX_BYTES for m in dlq)
        by_offset = {r["offset"]: r for r in (json.loads(m.value) for m in dlq)}
        first = len(before)
        reasons = {name: by_offset[offsets[first + i]]["reason"] for i, name in enumerate(poison)}
        assert reasons["nested_2kb"].startswith("message nests arrays or objects too deep")
        assert reasons["ts_400_digits"].endswith("is out of range")
        assert reasons["invalid_1mb"] == "text is 450000 characters long (at most 1024)"
        assert reasons["id_1000_digits"] == "user_id is an integer of more than 256 digits"
        assert reasons["whitespace_id"] == "item_id is only whitespace"
        assert reasons["ts_zero"].startswith("ts '0' is before")
        big = by_offset[offsets[first + poison.index("invalid_1mb")]]
        assert big["truncated"] is True and big["payload_bytes"] == len(POISON["invalid_1mb"])
        element_letter = by_offset[offsets[first + len(poison)]]
        assert element_letter["payload"] == element and element_letter["topic"] == s.events_topic
        assert w.stop() == 0, w.tail()
    finally:
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait()
