"""stream.replay against the real broker: keys, per-user order, grouping, rate limit."""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict

import pytest

from stream.events import parse_message
from stream.replay import produce_events, replay
from stream.topics import read_topic_async
from userstream.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(tmp_path, broker) -> Settings:
    tag = uuid.uuid4().hex[:8]
    return Settings(
        data_dir=tmp_path,
        kafka_bootstrap_servers=broker,
        events_topic=f"replay-{tag}",
        dlq_topic=f"replay-dlq-{tag}",
        topic_partitions=2,
    )


def test_replay_keys_by_user_keeps_time_order_and_groups_runs(tmp_path, broker, settings):
    path = tmp_path / "x.inter"
    rows = [  # (user, item, ts); u1 has a run of 3 consecutive events in time order
        ("u1", "a", 10), ("u1", "b", 11), ("u1", "c", 12), ("u2", "d", 13),
        ("u1", "e", 14), ("u3", "f", 9), ("u2", "g", 15), ("u2", "h", 16),
    ]  # fmt: skip
    path.write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        + "".join(f"{u}\t{i}\t5\t{t}\n" for u, i, t in rows)
    )
    report = replay(path, "movielens", settings, batch=2, progress=False)
    # time order: f | a b | c | d | e | g h  -> runs of u1 and u2 cut at batch=2
    assert (report.events, report.messages, report.failed) == (8, 6, 0)
    # the highest acked offset per partition: a fresh topic numbers from 0
    assert sum(o + 1 for o in report.offsets.values()) == 6
    msgs = asyncio.run(read_topic_async(broker, settings.events_topic, min_messages=6))
    per_user: dict[str, list[tuple[str, float]]] = defaultdict(list)
    sizes = []
    for m in sorted(msgs, key=lambda m: (m.partition, m.offset)):
        events, bad = parse_message(m.value)
        assert bad == [] and {e.user_id for e in events} == {m.key.decode()}
        sizes.append(len(events))
        per_user[m.key.decode()].extend((e.item_id, e.ts) for e in events)
    assert sorted(sizes) == [1, 1, 1, 1, 2, 2]
    assert per_user == {
        "u1": [("a", 10.0), ("b", 11.0), ("c", 12.0), ("e", 14.0)],
        "u2": [("d", 13.0), ("g", 15.0), ("h", 16.0)],
        "u3": [("f", 9.0)],
    }


def test_rate_limit(settings):
    events = [
        {"user_id": f"u{i % 7}", "item_id": "x", "behavior": "view", "ts": i} for i in range(40)
    ]
    report = produce_events(settings, events, rate=200.0, progress=False, group=1)
    assert report.events == 40 and report.messages == 40
    assert 0.17 < report.seconds < 2.0
    assert report.events_per_s < 240
