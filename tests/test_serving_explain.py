"""``GET /users/{id}/similar?explain=true`` and :mod:`model.explain`: leave-one-out
weights on a hand-made bag model, the encoder's own drops, then a model trained
on a planted stream (real Redis, a real checkpoint, the FastAPI app)."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from model.batching import Batch, collate, encode_sequence, make_batch
from model.encoder import EncoderConfig, SequenceEncoder
from model.explain import explain_similar, explain_similar_with
from model.trainer import Trainer
from model.vocab import BehaviorVocab, ItemVocab
from serving import create_app
from stream.generator import DEFAULT_BEHAVIORS, ClickstreamGenerator
from tests.helpers import tiny_settings
from userstream.settings import Settings
from userstream.stores import ModelInfo, RedisEmbeddingStore, RedisSequenceStore
from userstream.types import Behavior, Event


def vocabularies(seqs: list[list[Behavior]]) -> tuple[ItemVocab, BehaviorVocab]:
    items, behaviors = ItemVocab(), BehaviorVocab()
    items.observe_many(x.item_id for s in seqs for x in s)
    behaviors.observe_many(x.behavior for s in seqs for x in s)
    return items, behaviors


def walk(names: str, behavior: str = "view", t0: float = 1000.0) -> list[Behavior]:
    return [Behavior(name, behavior, t0 + 60.0 * t) for t, name in enumerate(names.split())]


# --- the attribution, by hand -----------------------------------------------------


def test_leave_one_out_weights_of_a_bag_model_by_hand():
    """The embedding is the normalized mean of fixed item vectors, so every weight
    is a cosine we can write down. In u, leaving out ``a`` (twice, once a cart,
    along v) costs most, then ``b``; leaving out ``c`` (orthogonal to v) or ``e``
    (against it) raises the similarity, so they are not returned. In v, ``d``
    carries the similarity and the shared item ``a`` does not: the weights come
    from the model, not from the overlap."""
    U, V = "a b a c e", "a d"
    u, v = walk(U), walk(V)
    u[2] = Behavior("a", "cart", u[2].ts)
    items, behaviors = vocabularies([u, v])
    vec = {"a": [1, 0, 0], "b": [0, 1, 0], "c": [0, 0, 1], "d": [0.6, 0.8, 0], "e": [-1, 0, 0]}
    table = torch.zeros(len(items), 3)
    for name, x in vec.items():
        table[items.rows_for([name])[0]] = torch.tensor(x, dtype=torch.float32)

    def embed(batch: Batch) -> torch.Tensor:  # (B, T) -> (B, 3)
        return SequenceEncoder.pool(table[batch.items], batch.items)

    def z(names: str, without: str = "") -> np.ndarray:
        m = np.mean([vec[n] for n in names.split() if n != without], axis=0)
        return m / np.linalg.norm(m)

    sim = float(z(U) @ z(V))
    want_u = {n: sim - float(z(U, without=n) @ z(V)) for n in "abce"}
    want_v = {n: sim - float(z(V, without=n) @ z(U)) for n in "ad"}
    assert want_u["a"] > want_u["b"] > 0 > max(want_u["c"], want_u["e"])  # the hand case
    assert want_v["d"] > 0 > want_v["a"]

    (pair,) = explain_similar_with(embed, items, behaviors, 8, 32, u, [v], top=10)
    assert pair.similarity == pytest.approx(sim, abs=1e-6)
    assert [c.item_id for c in pair.user] == ["a", "b"]  # only positive weights, largest first
    assert [c.weight for c in pair.user] == pytest.approx([want_u["a"], want_u["b"]], abs=1e-6)
    assert [c.behaviors for c in pair.user] == [{"view": 1, "cart": 1}, {"view": 1}]
    assert [c.shared for c in pair.user] == [True, False]
    assert [(c.item_id, c.shared) for c in pair.other] == [("d", False)]
    assert pair.other[0].weight == pytest.approx(want_v["d"], abs=1e-6)

    # top caps each side; an empty sequence on either side is nothing to explain
    (capped,) = explain_similar_with(embed, items, behaviors, 8, 32, u, [v], top=1)
    assert [c.item_id for c in capped.user] == ["a"] and len(capped.other) == 1
    assert explain_similar_with(embed, items, behaviors, 8, 32, u, [[], v], 3)[0] is None
    assert explain_similar_with(embed, items, behaviors, 8, 32, [], [v], 3) == [None]
    with pytest.raises(ValueError, match="top must be >= 1"):
        explain_similar_with(embed, items, behaviors, 8, 32, u, [v], top=0)


def test_weights_are_the_encoders_own_leave_one_out_drops():
    """With a real encoder (attention, gaps, positions), a sequence longer than
    max_len: the similarity is that of the embeddings the training worker writes
    (``make_batch``), and each weight the drop with the item's behaviors left out
    of the window, the next gap taken from the timestamps again."""
    T = 6
    rng = np.random.default_rng(3)
    names = [f"i{k}" for k in range(5)]

    def seq(n: int, t0: float) -> list[Behavior]:
        ts = t0 + np.cumsum(rng.exponential(300.0, n))
        kinds = ["view", "click", "cart"]
        return [Behavior(rng.choice(names), kinds[rng.integers(3)], float(t)) for t in ts]

    u, v, w = seq(9, 0.0), seq(4, 50.0), seq(7, 90.0)
    items, behaviors = vocabularies([u, v, w])
    torch.manual_seed(0)
    enc = SequenceEncoder(EncoderConfig(n_items=len(items), max_len=T, hidden=16, layers=2, heads=2,
                                        dropout=0.0)).eval()  # fmt: skip

    @torch.inference_mode()
    def z_batch(s: list[Behavior]) -> np.ndarray:
        b = make_batch([s], items, behaviors, T, 32, trim=True)
        return enc.user_embedding(b.items, b.behaviors, b.gaps)[0].numpy()

    @torch.inference_mode()
    def z_without(s: list[Behavior], item: str) -> np.ndarray:
        ctx = s[-(T + 1) :]
        lead = ctx[:-T]
        kept = lead + [x for x in ctx[-T:] if x.item_id != item]
        rows = encode_sequence(kept, items, behaviors, 32)[len(lead) :]
        b = collate([rows])
        return enc.user_embedding(b.items, b.behaviors, b.gaps)[0].numpy()

    pairs = explain_similar(enc, items, behaviors, u, [v, w], top=T)
    for other, pair in zip([v, w], pairs, strict=True):
        sim = float(z_batch(u) @ z_batch(other))
        assert pair.similarity == pytest.approx(sim, abs=1e-5)
        for mine, theirs, got in ((u, other, pair.user), (other, u, pair.other)):
            window = {x.item_id for x in mine[-T:]}
            drops = {i: sim - float(z_without(mine, i) @ z_batch(theirs)) for i in window}
            want = sorted((i for i in drops if drops[i] > 0), key=lambda i: -drops[i])
            assert [c.item_id for c in got] == want
            assert [c.weight for c in got] == pytest.approx([drops[i] for i in want], abs=1e-5)
            for c in got:
                counted = collections.Counter(
                    x.behavior for x in mine[-T:] if x.item_id == c.item_id
                )
                assert c.behaviors == dict(counted)
                assert c.shared == (c.item_id in {x.item_id for x in theirs[-T:]})


# --- the API -----------------------------------------------------------------------


def store_events(redis_client, keys, seqs: dict[str, list[Behavior]]) -> None:
    flat = [(u, x) for u, s in seqs.items() for x in s]
    events = [(0, n, Event(u, x.item_id, x.behavior, x.ts)) for n, (u, x) in enumerate(flat, 1)]
    RedisSequenceStore(redis_client, keys).apply_many("behavior-events", events)


@pytest.fixture
def settings(tmp_path, redis_prefix, redis_url) -> Settings:
    return tiny_settings(tmp_path, redis_prefix=redis_prefix, redis_url=redis_url, max_len=20,
                         sequence_length=60, train_batch_size=32, learning_rate=5e-3, seed=0)  # fmt: skip


def similar(c: TestClient, user: str, **params):
    return c.get(f"/users/{user}/similar", params=params)


def test_plain_answer_bounds_and_503_before_the_first_checkpoint(settings, redis_client, keys):
    seqs = {f"u{k}": walk(f"a{k % 3} b{k % 3} a{k % 3} c", t0=k * 1e4) for k in range(6)}
    store_events(redis_client, keys, seqs)
    store = RedisEmbeddingStore(redis_client, keys, feed_maxlen=1000)
    vecs = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32)
    store.upsert(list(seqs), vecs / np.linalg.norm(vecs, axis=1, keepdims=True), version=1)
    with TestClient(create_app(settings, redis_client=redis_client)) as c:
        assert c.app.state.ctx.follower.wait_for(store.feed_head(), timeout=5)
        plain = similar(c, "u0", k=3)
        assert plain.status_code == 200, plain.text
        body = plain.json()
        assert set(body) == {"user_id", "model_version", "neighbors"}
        assert all(set(n) == {"user_id", "score"} for n in body["neighbors"])  # as before
        assert similar(c, "u0", k=3, explain="false", explain_top=5).json() == body

        r = similar(c, "u0", k=3, explain="true")
        assert r.status_code == 503 and r.headers["Retry-After"] == "10"
        assert "no model checkpoint" in r.json()["detail"]
        assert str(settings.checkpoint_dir) in r.json()["detail"]
        assert "without it" in r.json()["detail"]

        for params in ({"explain_top": 0}, {"explain_top": 11}, {"explain": "maybe"},
                       {"explain": "true", "k": 51}):  # fmt: skip
            r = similar(c, "u0", **params)
            assert r.status_code == 422, (params, r.text)
        assert "at most 50 neighbours" in similar(c, "u0", explain="true", k=51).json()["detail"]
        assert similar(c, "nobody", explain="true").status_code == 404

        spec = c.get("/openapi.json").json()
        params = {
            p["name"]: p for p in spec["paths"]["/users/{user_id}/similar"]["get"]["parameters"]
        }
        assert (
            params["explain_top"]["schema"]["maximum"] == 10 and "description" in params["explain"]
        )
        schemas = spec["components"]["schemas"]
        assert "explanation" in schemas["Neighbor"]["properties"]
        for name, field in (("Explanation", "similarity"), ("ExplainedBehavior", "weight"),
                            ("ExplainedBehavior", "behaviors")):  # fmt: skip
            assert schemas[name]["properties"][field]["description"], (name, field)


@pytest.fixture
def one_thread():
    """One torch thread while the test trains (the same weights on any machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def planted_stream(seed: int = 5) -> tuple[ClickstreamGenerator, dict[str, list[Behavior]]]:
    """48 users of 4 interest groups (20 items each); 30% of a user's events fall on
    other groups' items (the generator's noise) and another 30% on the user's own
    item ``own-<user>``, nobody else's: the item a user repeats most is usually
    that one, so counting a window's items cannot find what two users share."""
    gen = ClickstreamGenerator(n_users=48, n_groups=4, items_per_group=20, seed=seed, noise=0.3)
    rng = np.random.default_rng(seed)
    seqs: dict[str, list[Behavior]] = collections.defaultdict(list)
    for e in gen.events(48 * 30):
        item = f"own-{e['user_id']}" if rng.random() < 0.3 else e["item_id"]
        seqs[e["user_id"]].append(Behavior(item, e["behavior"], e["ts"]))
    return gen, dict(seqs)


def test_explanations_on_a_planted_stream_name_the_groups_items(
    settings, redis_client, keys, one_thread
):
    """After a few seconds of training on :func:`planted_stream`, the explained
    items of same-group neighbours are mostly the group's (far above the share
    in the windows, and above the most repeated items), the top one on each side
    nearly always, and a user's own item almost never."""
    gen, raw = planted_stream()
    store_events(redis_client, keys, raw)
    users = sorted(raw)
    seqs = dict(zip(users, RedisSequenceStore(redis_client, keys).read_many(users), strict=True))

    def group(item_id: str) -> int:
        return -1 if item_id.startswith("own-") else gen.item_group(item_id)

    trainer = Trainer(settings)
    trainer.learn_many(list(seqs.values()), steps=60)
    trainer.save(settings.checkpoint_dir)
    store = RedisEmbeddingStore(redis_client, keys, feed_maxlen=1000)
    vectors = trainer.embed_many(list(seqs.values()))
    store.upsert(users, vectors, version=trainer.version)
    store.upsert(["ghost"], vectors[:1], version=trainer.version)  # an embedding, no behaviors
    store.set_model_info(ModelInfo(trainer.version, "x", len(trainer.items), 1.0, 1.0))

    L, top = settings.max_len, 3
    windows = {u: seqs[u][-L:] for u in users}
    base = np.mean([group(x.item_id) == gen.group_of(u) for u in users for x in windows[u]])
    hits, firsts, own, counted, weights, pairs = [], [], [], [], [], 0
    with TestClient(create_app(settings, redis_client=redis_client)) as c:
        assert c.app.state.ctx.follower.wait_for(store.feed_head(), timeout=5)
        for q in users[:12]:
            r = similar(c, q, k=5, explain="true", explain_top=top)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["user_id"] == q and len(body["neighbors"]) == 5
            plain = similar(c, q, k=5).json()
            assert [n["user_id"] for n in plain["neighbors"]] == [
                n["user_id"] for n in body["neighbors"]
            ]
            for n in body["neighbors"]:
                ex = n["explanation"]
                if n["user_id"] == "ghost":
                    assert ex is None  # no stored behaviors: nothing to explain
                    continue
                assert ex["model_version"] == trainer.version
                assert ex["similarity"] == pytest.approx(n["score"], abs=1e-3)
                for side in (ex["user_behaviors"], ex["neighbor_behaviors"]):
                    assert 1 <= len(side) <= top
                    w = [b["weight"] for b in side]
                    assert w == sorted(w, reverse=True) and all(x > 0 for x in w)
                    for b in side:
                        assert b["behaviors"] and all(
                            kind in DEFAULT_BEHAVIORS and count >= 1
                            for kind, count in b["behaviors"].items()
                        )
                g = gen.group_of(q)
                if gen.group_of(n["user_id"]) != g:
                    continue
                pairs += 1
                sides = ((ex["user_behaviors"], q), (ex["neighbor_behaviors"], n["user_id"]))
                for side, who in sides:
                    mine = [group(b["item_id"]) == g for b in side]
                    hits += mine
                    firsts.append(mine[0])
                    own += [group(b["item_id"]) == -1 for b in side]
                    weights += [(b["weight"], m) for b, m in zip(side, mine, strict=True)]
                    most = collections.Counter(x.item_id for x in windows[who]).most_common(top)
                    counted += [group(i) == g for i, _ in most]  # the counting baseline
    assert pairs >= 20, f"only {pairs} same-group neighbour pairs: the model did not learn"
    share, first, by_count = np.mean(hits), np.mean(firsts), np.mean(counted)
    weighted = sum(w for w, m in weights if m) / sum(w for w, _ in weights)
    print(f"over {pairs} pairs: group items {share:.2f} of the explained, top-1 {first:.2f}, "
          f"weighted {weighted:.2f}, own items {np.mean(own):.2f}; in the windows {base:.2f}, "
          f"of the {top} most repeated {by_count:.2f}")  # fmt: skip
    assert share >= 0.7 and share >= base + 0.2 and share >= by_count + 0.1
    assert first >= 0.7 and weighted >= 0.7
    assert np.mean(own) <= 0.15
