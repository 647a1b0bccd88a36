"""The leave-one-out split of PROTOCOL section 1 on a tiny hand-made data set."""

from __future__ import annotations

import numpy as np
import pytest

from model.offline.datasets import load_sequences, sequences_from_events
from model.offline.split import leave_one_out
from model.offline.train import (
    derive_dropout,
    derive_examples,
    prefixes,
    training_examples,
    windows,
)
from tests.conftest import shared_data
from userstream.settings import OfflineConfig


def events(rows):
    return [{"user_id": u, "item_id": i, "behavior": "view", "ts": t} for u, i, t in rows]


def test_leave_one_out_on_a_hand_made_data_set():
    seqs = sequences_from_events(
        events(
            [
                ("u1", "a", 1),
                ("u2", "x", 2),
                ("u1", "b", 3),
                ("u3", "p", 4),
                ("u1", "c", 5),
                ("u2", "y", 6),  # u2 has two behaviors: left out
                ("u3", "q", 7),
                ("u1", "d", 8),
                ("u3", "r", 9),
            ]
        )
    )
    split = leave_one_out(seqs)
    assert split.users == ["u1", "u3"]
    ids = [[b.item_id for b in s] for s in split.train]
    assert ids == [["a", "b"], ["p"]]
    assert split.train_lengths == [2, 1]
    v_in, v_target = split.valid
    assert [[b.item_id for b in s] for s in v_in] == [["a", "b"], ["p"]]
    assert [b.item_id for b in v_target] == ["c", "q"]
    t_in, t_target = split.test
    assert [[b.item_id for b in s] for s in t_in] == [["a", "b", "c"], ["p", "q"]]
    assert [b.item_id for b in t_target] == ["d", "r"]
    # the catalogue holds every item of the kept users, targets included
    assert split.items() == ["a", "b", "c", "d", "p", "q", "r"]
    assert seqs["u1"][0].ts == 1.0 and seqs["u1"][0].behavior == "view"


def test_windows_make_every_step_a_target_exactly_once():
    seq = np.arange(12).repeat(3).reshape(12, 3)  # rows 0..11
    got = windows([seq, seq[:1], seq[:2]], max_len=4)
    # windows of <= 5 steps from the end, sharing one step; [0] alone is dropped
    assert [w[:, 0].tolist() for w in got] == [
        [7, 8, 9, 10, 11],
        [3, 4, 5, 6, 7],
        [0, 1, 2, 3],
        [0, 1],
    ]
    targets = [t for w in got[:3] for t in w[1:, 0].tolist()]
    assert sorted(targets) == list(range(1, 12))


def test_prefixes_make_every_step_a_last_step_once():
    seq = np.arange(7).repeat(3).reshape(7, 3)  # rows 0..6
    got = prefixes([seq, seq[:1], seq[:2]], max_len=3)
    assert [p[:, 0].tolist() for p in got] == [
        [0, 1],
        [0, 1, 2],
        [0, 1, 2, 3],
        [1, 2, 3, 4],  # at most max_len steps before the target
        [2, 3, 4, 5],
        [3, 4, 5, 6],
        [0, 1],
    ]


@pytest.mark.parametrize("kind", ["windows", "prefixes"])
def test_an_epoch_reads_every_target_once_and_every_window_once(kind):
    rng = np.random.default_rng(0)
    seqs = [
        np.arange(n + 2).repeat(3).reshape(n + 2, 3) + 100 * u for u, n in enumerate(range(1, 30))
    ]
    ex = training_examples(seqs, OfflineConfig(examples=kind).with_model(max_len=8))
    steps = ex.epoch(batch_size=16, rng=rng)
    rows = sorted(i for idx, _ in steps for i in idx)
    assert rows == list(range(len(ex.rows)))
    targets = sorted(
        t for i in rows for t in ex.rows[i][(1 if kind == "windows" else -1) :, 0].tolist()
    )
    assert targets == sorted(
        t for e in seqs for t in e[1:-2, 0].tolist()
    )  # all, once; none held out
    sides = [side for _, side in steps]
    if kind == "windows":
        assert ex.side is ex.rows and all(side is None for side in sides)
    else:  # the windows ride along on the same steps, each once
        assert sorted(i for side in sides if side is not None for i in side) == list(
            range(len(ex.side))
        )
        assert len(ex.rows) == ex.targets > len(ex.side)


def test_dropout_and_examples_come_from_measured_sequence_lengths():
    assert derive_dropout([3, 4, 5, 9]) == 0.5  # short (Amazon-like)
    assert derive_dropout([80, 120, 300]) == 0.2  # long (MovieLens-like)
    assert derive_examples([3, 4, 5, 9], next_weight=1.0) == "prefixes"
    assert derive_examples([80, 120, 300], next_weight=1.0) == "windows"  # prefixes: ~25x work
    assert derive_examples([3, 4, 5, 9], next_weight=0.0) == "windows"  # nothing to feed


@pytest.mark.data
def test_beauty_split_matches_the_published_counts():

    seqs = load_sequences(shared_data("beauty", "Beauty.txt"), "amazon-seq")
    split = leave_one_out(seqs)
    assert len(split) == 22_363 and len(split.items()) == 12_101
    assert sum(len(s) for s in split.full) == 198_502
    # every prefix of s_1..s_{n-2} is a target: RecBole's 131,413 training sequences
    assert sum(len(s) - 1 for s in split.train) == 131_413
    first = split.users[0]
    assert [b.item_id for b in seqs[first][:3]] == ["1", "2", "3"]  # file order kept
