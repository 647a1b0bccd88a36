"""The training worker against real Redis (the conftest fixtures): cycles, dirty-set
handling, embedding refresh, failure recovery, restarts and the event trigger."""

from __future__ import annotations

import itertools
import random
import threading

import numpy as np
import pytest
import torch

from model.live import Reservoir, TrainingWorker, load_trainer
from tests.helpers import tiny_settings, wait_until
from userstream.settings import Settings
from userstream.stores import RedisEmbeddingStore, RedisSequenceStore, SequenceStore
from userstream.types import Event

torch.set_num_threads(1)

pytestmark = pytest.mark.integration

TOPIC = "behavior-events"


class Feed:
    """Writes planted events with increasing offsets, as the stream worker would.

    Users u0..u{n-1}; user k belongs to group k % 2 and only touches that
    group's items (a walk with stride 1 or 2 over 10 items)."""

    def __init__(self, store: SequenceStore, n_users: int = 24, seed: int = 0) -> None:
        self.store = store
        self.users = [f"u{k}" for k in range(n_users)]
        self.rng = random.Random(seed)
        self.offsets = itertools.count()
        self.pos = {u: self.rng.randrange(10) for u in self.users}
        self.stride = {u: self.rng.choice([1, 2]) for u in self.users}
        self.clock = 1_700_000_000.0

    def group(self, user: str) -> int:
        return int(user[1:]) % 2

    def write(self, users, per_user: int) -> int:
        batch = []
        for _ in range(per_user):
            for u in users:
                self.pos[u] = (self.pos[u] + self.stride[u]) % 10
                self.clock += 7.0
                item = f"g{self.group(u)}-item{self.pos[u]}"
                behavior = self.rng.choice(["view", "view", "click", "cart"])
                batch.append((0, next(self.offsets), Event(u, item, behavior, self.clock)))
        return self.store.apply_many(TOPIC, batch).applied


def make_settings(tmp_path, keys, **kw) -> Settings:
    base = dict(
        redis_prefix=keys.prefix,
        max_len=16,
        sequence_length=32,
        train_steps=10,
        train_batch_size=16,
        learning_rate=3e-3,
        reservoir_size=100,
        refresh_budget=1000,
        embed_batch_size=8,
        keep_checkpoints=2,
    )
    return tiny_settings(tmp_path, **{**base, **kw})


@pytest.fixture
def stores(redis_client, keys):
    return RedisSequenceStore(redis_client, keys, 32), RedisEmbeddingStore(redis_client, keys, 1000)


def test_cycles_embed_everybody_and_separate_the_planted_groups(tmp_path, keys, stores):
    seq_store, emb_store = stores
    s = make_settings(tmp_path, keys)
    feed = Feed(seq_store)
    feed.write(feed.users, per_user=12)
    worker = TrainingWorker(s, seq_store, emb_store)

    reports = [worker.run_cycle()]
    for _ in range(2):
        feed.write(feed.users[:8], per_user=3)  # only some users come back
        reports.append(worker.run_cycle())

    assert [r.version for r in reports] == [1, 2, 3]
    assert [r.dirty_users for r in reports] == [24, 8, 8]
    assert all(r.ran and np.isfinite(r.loss) for r in reports)
    assert reports[1].replay_users == 8  # older users replayed beside the dirty ones
    assert reports[2].embedded_users == 24  # dirty + every other user refreshed
    assert seq_store.dirty_count() == 0
    info = emb_store.model_info()
    assert info.version == 3 and info.items == 20
    assert info.checkpoint == str(s.checkpoint_dir / "ckpt-00000003.pt")

    vectors = np.stack([emb_store.get(u) for u in feed.users])  # (24, H)
    assert vectors.shape == (24, 32)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert {emb_store.version_of(u) for u in feed.users} == {3}
    groups = np.array([feed.group(u) for u in feed.users])
    sim = vectors @ vectors.T
    same = groups[:, None] == groups[None, :]
    off_diag = ~np.eye(len(groups), dtype=bool)
    within, across = sim[same & off_diag].mean(), sim[~same].mean()
    assert within > across + 0.3, (within, across)

    idle = worker.run_cycle()  # nothing dirty: no new version, no writes
    assert not idle.ran and idle.version == 3 and emb_store.model_info().version == 3


def second_cycle(s: Settings, stores, n_users: int, returning: int):
    """A cycle over ``n_users`` new users, then one after the first ``returning`` come back."""
    seq_store, emb_store = stores
    feed = Feed(seq_store, n_users=n_users)
    feed.write(feed.users, per_user=5)
    worker = TrainingWorker(s, seq_store, emb_store)
    worker.run_cycle()
    feed.write(feed.users[:returning], per_user=2)
    return worker.run_cycle(), feed


@pytest.mark.parametrize(("ratio", "replayed"), [(0.0, 0), (0.5, 2), (2.0, 8), (10.0, 16)])
def test_replay_ratio_sets_older_users_per_dirty_user(tmp_path, keys, stores, ratio, replayed):
    """ratio x dirty users are replayed, at most what is not dirty (16 here)."""
    s = make_settings(
        tmp_path, keys, replay_ratio=ratio, train_steps=4, refresh_budget=0, train_batch_size=4
    )
    report, _ = second_cycle(s, stores, n_users=20, returning=4)
    assert (report.dirty_users, report.replay_users) == (4, replayed)


@pytest.mark.parametrize(
    ("n_users", "fill", "replayed"), [(17, True, 7), (5, True, 4), (17, False, 2)]
)
def test_replay_fills_a_batch_when_few_users_are_dirty(
    tmp_path, keys, stores, n_users, fill, replayed
):
    """One dirty user is never trained on alone: replayed users fill the batch (8),
    whatever the ratio, bounded by the users that are not dirty; without the fill,
    the ratio (2) alone."""
    s = make_settings(
        tmp_path, keys, replay_ratio=0.0 if fill else 2.0, replay_fill=fill, train_steps=3,
        refresh_budget=0, train_batch_size=8,
    )  # fmt: skip
    report, _ = second_cycle(s, stores, n_users=n_users, returning=1)
    assert (report.dirty_users, report.replay_users) == (1, replayed)


def test_without_refresh_budget_only_dirty_users_are_re_embedded(tmp_path, keys, stores):
    s = make_settings(tmp_path, keys, refresh_budget=0, train_steps=2)
    report, feed = second_cycle(s, stores, n_users=10, returning=3)
    assert report.embedded_users == 3
    assert [stores[1].version_of(u) for u in feed.users] == [2] * 3 + [1] * 7


def test_refresh_is_round_robin_over_all_users(tmp_path, keys, stores):
    seq_store, emb_store = stores
    s = make_settings(tmp_path, keys, refresh_budget=4, train_steps=1)
    feed = Feed(seq_store, n_users=10)
    feed.write(feed.users, per_user=3)
    worker = TrainingWorker(s, seq_store, emb_store)
    worker.run_cycle()  # v1: all 10 dirty
    for _ in range(3):  # v2..v4: one dirty user, 4 refreshed each time
        feed.write(["u0"], per_user=1)
        assert worker.run_cycle().embedded_users == 5
    # 3 cycles x 4 refreshed cover the 9 other users (the round robin wraps around)
    assert all(emb_store.version_of(u) >= 2 for u in feed.users)


def test_failed_cycle_puts_dirty_users_back(tmp_path, keys, stores, monkeypatch):
    seq_store, emb_store = stores
    s = make_settings(tmp_path, keys, train_steps=1)
    feed = Feed(seq_store, n_users=6)
    feed.write(feed.users, per_user=4)
    worker = TrainingWorker(s, seq_store, emb_store)

    def boom(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(worker.trainer, "learn_many", boom)
    with pytest.raises(RuntimeError):
        worker.run_cycle()
    assert seq_store.dirty_count() == 6 and emb_store.model_info() is None
    monkeypatch.undo()
    assert worker.run_cycle().dirty_users == 6 and seq_store.dirty_count() == 0


def test_restarted_worker_continues_from_the_checkpoint(tmp_path, keys, stores):
    seq_store, emb_store = stores
    s = make_settings(tmp_path, keys, train_steps=2)
    feed = Feed(seq_store, n_users=8)
    feed.write(feed.users, per_user=4)
    first = TrainingWorker(s, seq_store, emb_store)
    first.run_cycle()
    feed.write(feed.users[:2], per_user=1)
    first.run_cycle()

    again = TrainingWorker(s, seq_store, emb_store, load_trainer(s))
    assert again.trainer.version == 2
    assert again.reservoir.users == first.reservoir.users and len(again.reservoir) == 8
    feed.write(feed.users[:2], per_user=1)
    assert again.run_cycle().version == 3


def test_reservoir_is_a_bounded_uniform_sample():
    res = Reservoir(size=50, seed=1)
    res.add_many([f"u{k}" for k in range(1000)])
    returning = [f"u{k}" for k in range(10)]
    outside = sum(u not in res.users for u in returning)
    res.add_many(returning)  # members are not offered twice
    assert len(res) == 50 == len(set(res.users)) and res.seen == 1000 + outside
    assert np.mean([int(u[1:]) for u in res.users]) == pytest.approx(500, abs=150)
    assert set(res.sample(10, exclude=set(res.users[:45]))) <= set(res.users[45:])
    copy = Reservoir(size=50)
    copy.load_state_dict(res.state_dict())
    assert copy.users == res.users and copy.seen == res.seen


def test_run_forever_trains_when_enough_events_arrive(tmp_path, keys, stores):
    seq_store, emb_store = stores
    s = make_settings(tmp_path, keys, train_interval_s=3600, train_every_events=20, train_steps=1)
    feed = Feed(seq_store, n_users=5)
    feed.write(feed.users, per_user=3)
    worker = TrainingWorker(s, seq_store, emb_store)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run_forever, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_until(lambda: worker.trainer.version == 1)  # the backlog at start-up
        feed.write(feed.users, per_user=2)  # 10 events: below the threshold
        polls = worker.polls
        wait_until(lambda: worker.polls >= polls + 3)  # it looked at the counter since
        assert worker.trainer.version == 1 and seq_store.dirty_count() == 5
        feed.write(feed.users, per_user=2)  # 20 since the last cycle: train now
        wait_until(lambda: worker.trainer.version == 2)
        # the embedder publishes the version once its users are re-embedded
        wait_until(lambda: emb_store.model_info().version == 2)
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()


def test_a_stop_interrupts_a_cycle_between_steps_and_keeps_its_users(tmp_path, keys, stores):
    seq_store, emb_store = stores
    s = make_settings(tmp_path, keys, train_steps=100_000)  # a cycle far longer than the test
    feed = Feed(seq_store, n_users=6)
    feed.write(feed.users, per_user=4)
    worker = TrainingWorker(s, seq_store, emb_store)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run_forever, args=(stop,), daemon=True)
    thread.start()
    wait_until(lambda: seq_store.claimed_count() == 6, what="the cycle to claim the users")
    stop.set()
    thread.join(30)
    assert not thread.is_alive(), "the stop did not interrupt the cycle"
    # nothing was published, and every claimed user is dirty again
    assert emb_store.model_info() is None and worker.trainer.version == 0
    assert seq_store.claimed_count() == 0 and sorted(seq_store.dirty_users()) == sorted(feed.users)


def test_a_worker_killed_mid_cycle_loses_no_refresh(tmp_path, keys, stores, redis_url):
    """kill -9 during a cycle: the claimed users are re-embedded by the next worker."""
    import os
    import signal
    import subprocess
    import sys

    seq_store, emb_store = stores
    feed = Feed(seq_store, n_users=6)
    feed.write(feed.users, per_user=4)
    env = {**os.environ, "REDIS_URL": redis_url, "REDIS_PREFIX": keys.prefix, "DATA_DIR": str(tmp_path),
           "HIDDEN_SIZE": "32", "NUM_LAYERS": "1", "MAX_LEN": "16", "SEQUENCE_LENGTH": "32",
           "DEVICE": "cpu", "TRAIN_INTERVAL_S": "0.1"}  # fmt: skip

    def worker(steps: int) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "userstream", "train-worker"],
            env={**env, "TRAIN_STEPS": str(steps)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    slow = worker(steps=100_000)
    try:
        wait_until(lambda: seq_store.claimed_count() == 6, 120, "a claim", proc=slow)
        slow.send_signal(signal.SIGKILL)
        slow.wait(10)
    finally:
        if slow.poll() is None:
            slow.kill()
    assert seq_store.dirty_count() == 0 and seq_store.claimed_count() == 6  # not lost
    fresh = worker(steps=2)
    try:
        wait_until(lambda: all(emb_store.get(u) is not None for u in feed.users), 120,
                   "every user embedded by the next worker", proc=fresh)  # fmt: skip
        # and the claims of the killed cycle went back and were trained on
        wait_until(lambda: seq_store.claimed_count() == 0 and seq_store.dirty_count() == 0,
                   120, "the killed cycle's users trained on", proc=fresh)  # fmt: skip
        wait_until(lambda: emb_store.model_info() is not None, 60, "the version published",
                   proc=fresh)  # fmt: skip
    finally:
        fresh.send_signal(signal.SIGTERM)
        assert fresh.wait(60) == 0  # a clean stop


def test_a_hung_redis_fails_the_cycle_and_its_users_come_back(tmp_path, keys):
    """Redis stops answering mid-cycle (SIGSTOP): the cycle times out, and once Redis
    answers again the claimed users are dirty again and get embedded."""
    import signal

    from userstream.embedded import free_port, start_redis
    from userstream.stores import connect

    port = free_port()
    proc = start_redis(port, tmp_path / "redis", tmp_path / "redis.log")
    client = connect(f"redis://127.0.0.1:{port}/0", socket_timeout=1.0)
    try:
        seq_store = RedisSequenceStore(client, keys, 32)
        emb_store = RedisEmbeddingStore(client, keys, 1000)
        feed = Feed(seq_store, n_users=6)
        feed.write(feed.users, per_user=4)
        worker = TrainingWorker(make_settings(tmp_path, keys, train_steps=2), seq_store, emb_store)
        real = worker.trainer.learn_many

        def learn_then_hang(*args, **kwargs):
            out = real(*args, **kwargs)
            proc.send_signal(signal.SIGSTOP)  # Redis hangs right before the writes
            return out

        worker.trainer.learn_many = learn_then_hang
        stop = threading.Event()
        thread = threading.Thread(target=worker.run_forever, args=(stop,), daemon=True)
        thread.start()
        try:
            # the hang turns into a failed cycle (socket timeout), not a stuck worker
            wait_until(lambda: worker.failed_cycles >= 1, 60, "the cycle to fail on the hang")
            assert proc_state(proc.pid) == "T"
            worker.trainer.learn_many = real
            proc.send_signal(signal.SIGCONT)
            wait_until(
                lambda: (
                    all((emb_store.version_of(u) or 0) >= 1 for u in feed.users)
                    and seq_store.claimed_count() == 0
                    and seq_store.dirty_count() == 0
                ),
                60,
                "every user trained on, re-embedded and released after Redis came back",
            )
        finally:
            proc.send_signal(signal.SIGCONT)
            stop.set()
            thread.join(30)
    finally:
        client.close()
        proc.terminate()
        proc.wait(10)


def proc_state(pid: int) -> str:
    """The process state letter from /proc (T = stopped)."""
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0]


def test_changed_users_are_embedded_while_a_long_cycle_trains(tmp_path, keys, stores):
    """Freshness does not wait for training: during a cycle far longer than the
    test, a new user and a returning user get embeddings that hold their newest
    event, made with the weights published so far."""
    seq_store, emb_store = stores
    s = make_settings(tmp_path, keys, train_steps=100_000, embed_poll_s=0.02)
    feed = Feed(seq_store, n_users=7)
    first, late = feed.users[:6], feed.users[6]
    feed.write(first, per_user=4)
    worker = TrainingWorker(s, seq_store, emb_store)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run_forever, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_until(lambda: seq_store.claimed_count() == 6, what="the long cycle to start")
        wait_until(lambda: all(emb_store.get(u) is not None for u in first),
                   what="the first events embedded")  # fmt: skip
        feed.write([late], per_user=2)
        feed.write(["u0"], per_user=1)
        newest_u0 = seq_store.read_tail("u0", 1)[0].ts
        newest_late = seq_store.read_tail(late, 1)[0].ts
        wait_until(lambda: emb_store.event_ts_of(late) == newest_late, 10, "the new user")
        wait_until(lambda: emb_store.event_ts_of("u0") == newest_u0, 10, "the returning user")
        assert worker.trainer.version == 0 and seq_store.claimed_count() == 6  # still training
        assert emb_store.version_of(late) == 0 and emb_store.model_info() is None
        assert seq_store.dirty_count("embed") + seq_store.claimed_count("embed") == 0
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()


def test_an_embedder_killed_mid_batch_leaves_its_users_stale(tmp_path, keys, stores, monkeypatch):
    """A batch that raises puts its users back; claims left by a crash go back at start."""
    from model.live.embedder import Embedder

    seq_store, emb_store = stores
    s = make_settings(tmp_path, keys)
    feed = Feed(seq_store, n_users=5)
    feed.write(feed.users, per_user=2)
    worker = TrainingWorker(s, seq_store, emb_store)
    monkeypatch.setattr(Embedder, "_embed", lambda *a: (_ for _ in ()).throw(OSError("down")))
    with pytest.raises(OSError):
        worker.embedder.run_once()
    assert seq_store.dirty_count("embed") == 5 and seq_store.claimed_count("embed") == 0
    monkeypatch.undo()
    assert len(seq_store.take_dirty(5, queue="embed")) == 5  # a crash right after the claim
    fresh = TrainingWorker(s, seq_store, emb_store)
    stop = threading.Event()
    thread = threading.Thread(target=fresh.embedder.run_forever, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_until(lambda: all(emb_store.get(u) is not None for u in feed.users), 10,
                   "the claimed users embedded by the next embedder")  # fmt: skip
    finally:
        stop.set()
        thread.join(10)
    assert seq_store.claimed_count("embed") == 0


def test_a_standing_backlog_of_changes_does_not_starve_the_refresh(tmp_path, keys, stores,
                                                                   monkeypatch):  # fmt: skip
    """Every batch finds the change queue full; while the oldest change is recent
    the changed users keep the whole batch, and once it has waited past
    BACKLOG_S the new version's refresh gets a share of each batch and its model
    info is published."""
    from model.live import embedder as embedder_module

    seq_store, emb_store = stores
    s = make_settings(tmp_path, keys, embed_claim_max=8)
    feed = Feed(seq_store, n_users=40)
    feed.write(feed.users, per_user=2)
    worker = TrainingWorker(s, seq_store, emb_store)
    while worker.embedder.run_once():
        pass
    trainer = worker.trainer
    trainer.learn_many(seq_store.read_many(feed.users), 1)
    info = worker._model_info(tmp_path / "v1.pt")
    worker.embedder.publish(trainer.snapshot(), info, feed.users[:20])
    rounds = 0
    feed.write(feed.users[20:], per_user=1)
    worker.embedder.run_once()  # a full batch of recent changes: no backlog yet
    assert len(worker.embedder._refresh) == 20
    monkeypatch.setattr(embedder_module, "BACKLOG_S", 0.0)  # every change now "waited long"
    while emb_store.model_info() is None:
        feed.write(feed.users[20:], per_user=1)  # 20 changed users before every batch
        assert seq_store.dirty_count("embed") >= 8
        worker.embedder.run_once()
        rounds += 1
        assert rounds <= 10, "the refresh starved"  # 2 of each batch of 8: 10 rounds
    assert emb_store.model_info().version == info.version


@pytest.mark.parametrize("kw", [{}, {"positions": "relative"}, {"lowpass_alpha": 0.5}])
def test_embedding_short_sequences_in_trimmed_batches_changes_nothing(tmp_path, kw):
    """Inference pads a batch to its longest sequence, not to max_len: the same vectors."""
    from model.batching import make_batch
    from model.trainer import Trainer
    from userstream.types import Behavior

    rng = random.Random(0)
    trainer = Trainer(tiny_settings(tmp_path, max_len=16, **kw))
    seqs = [[Behavior(f"i{rng.randrange(50)}", rng.choice(["view", "click"]), 1e9 + 60.0 * k)
             for k in range(rng.randrange(1, 9))] for _ in range(40)]  # fmt: skip
    trainer.observe_many(seqs)
    got = trainer.embed_many(seqs)
    with torch.inference_mode():
        trainer.encoder.eval()
        c = trainer.config
        b = make_batch(seqs, trainer.items, trainer.behaviors, c.max_len, c.n_gap_buckets)
        full = trainer.encoder.user_embedding(b.items, b.behaviors, b.gaps).numpy()
    np.testing.assert_allclose(got, full, atol=1e-5)
