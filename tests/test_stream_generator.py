"""stream.generator.ClickstreamGenerator: seeded, planted groups, growing catalog, drift."""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import pytest

from stream.events import parse_message
from stream.generator import DEFAULT_BEHAVIORS, ClickstreamGenerator


def make(**kw) -> ClickstreamGenerator:
    args = {"n_users": 50, "n_groups": 5, "items_per_group": 40, "seed": 7}
    args.update(kw)
    return ClickstreamGenerator(**args)


def test_same_seed_same_stream_other_seed_differs():
    a = list(make().events(500))
    assert a == list(make().events(500))
    assert a != list(make(seed=8).events(500))


def test_events_are_valid_time_ordered_and_interleaved():
    evs = list(make().events(2000, start_ts=1_600_000_000.0))
    assert all(a["ts"] < b["ts"] for a, b in zip(evs, evs[1:], strict=False))
    assert evs[0]["ts"] > 1_600_000_000.0
    events, bad = parse_message(json.dumps(evs).encode())
    assert bad == [] and len(events) == 2000
    assert len({e["user_id"] for e in evs[:100]}) > 30  # users interleave
    assert evs[0]["user_id"].startswith("u") and len(evs[0]["user_id"]) == 5
    assert evs[0]["item_id"][:1] == "g" and "-i" in evs[0]["item_id"]


def test_planted_groups_are_visible():
    gen = make(noise=0.1)
    per_user: dict[str, list[int]] = defaultdict(list)
    for ev in gen.events(5000):
        per_user[ev["user_id"]].append(gen.item_group(ev["item_id"]))
    share = [
        sum(g == gen.group_of(u) for g in groups) / len(groups) for u, groups in per_user.items()
    ]
    assert len(share) == 50
    assert min(share) > 0.7 and sum(share) / len(share) == pytest.approx(0.9, abs=0.04)
    assert len({gen.group_of(u) for u in gen.user_ids}) == 5


def test_all_behaviors_present_in_rough_proportion_and_search_has_text():
    evs = list(make().events(5000))
    counts = Counter(ev["behavior"] for ev in evs)
    assert set(counts) == set(DEFAULT_BEHAVIORS)
    assert counts["view"] > counts["click"] > counts["search"] > counts["purchase"]
    assert all(ev.get("text") for ev in evs if ev["behavior"] == "search")
    assert not any("text" in ev for ev in evs if ev["behavior"] != "search")


def test_new_items_appear_over_time():
    gen = make(new_items_rate=0.05)
    first = {ev["item_id"] for ev in gen.events(2000)}
    later = {ev["item_id"] for ev in gen.events(2000)}  # continues the same stream
    fresh = later - first
    assert sum(gen.items_in(g) for g in range(5)) > 5 * 40 + 150
    assert any(int(i.split("-i")[1]) >= 40 for i in fresh)
    assert all(int(i.split("-i")[1]) < 40 for i in {ev["item_id"] for ev in make().events(2000)})


def test_drift_moves_users_between_groups():
    gen = make(drift_every=1000, drift_prob=0.5)
    before = {u: gen.group_of(u) for u in gen.user_ids}
    list(gen.events(1001))
    moved = sum(gen.group_of(u) != g for u, g in before.items())
    assert 10 < moved < 40
    with pytest.raises(ValueError):
        make(noise=1.5)


def test_sessions_cover_every_user_in_bursts_of_one_user():
    gen = ClickstreamGenerator(n_users=200, n_groups=4, items_per_group=50, seed=3, noise=0.0)
    runs = list(gen.sessions(300, length=4))
    assert all(len(s) == 4 and len({e["user_id"] for e in s}) == 1 for s in runs)
    assert {s[0]["user_id"] for s in runs[:200]} == set(gen.user_ids)  # one pass covers all
    stamps = [e["ts"] for s in runs for e in s]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    for s in runs:  # noise 0: every item from the user's own group
        assert all(gen.item_group(e["item_id"]) == gen.group_of(e["user_id"]) for e in s)
    with pytest.raises(ValueError, match="length"):
        next(gen.sessions(1, length=0))
