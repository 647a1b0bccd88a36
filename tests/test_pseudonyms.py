"""Pseudonymous ids (issue 18): the keyed hash, the ingest path (no raw id in Redis)
and the API (raw ids and pseudonyms answer the same; DELETE with the raw id erases)."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from serving import create_app
from stream.agents import BatchWriter
from userstream.pseudonyms import Pseudonymizer, id_scheme, is_pseudonym, pseudonym
from userstream.settings import Settings
from userstream.stores import ModelInfo, RedisEmbeddingStore, RedisSequenceStore
from userstream.types import Keys

KEY = "test-key-not-secret"
RAW = ["raw-alice-3f9", "raw-bob/with-slash", "raw-carol-ü"]  # distinctive, to grep Redis for
TOPIC = "events"


def _message(user: str, item: str, ts: int = 1_700_000_000) -> bytes:
    return json.dumps({"user_id": user, "item_id": item, "behavior": "view", "ts": ts}).encode()


# --- the hash -------------------------------------------------------------------


def test_pseudonym_is_stable_keyed_and_prefixed():
    p = pseudonym("u1", b"k1")
    assert p == pseudonym("u1", b"k1") and is_pseudonym(p)
    assert p.startswith("p:") and len(p) == 34
    assert pseudonym("u1", b"k2") != p  # another key, another id
    assert pseudonym("u2", b"k1") != p
    assert not is_pseudonym("u1") and not is_pseudonym(p.upper()) and not is_pseudonym(p + "0")


@pytest.mark.parametrize("key", [b"k", b"x" * 64, b"long" * 40, "ключ".encode()])
def test_the_fast_path_is_hmac_sha256(key):
    """Pseudonymizer hashes from precomputed pad states; the value is plain HMAC-SHA256."""
    on = Pseudonymizer(key)
    for user in ("u1", "", "ü/ß 7", "x" * 300, "a\udcff"):
        assert on.of(user) == pseudonym(user, key)


def test_pseudonymizer_off_is_the_identity_and_on_maps_raw_ids_only():
    off = Pseudonymizer(None)
    assert not off.on and off.of("u1") == "u1" and off.of_query("u1") == "u1"
    on = Pseudonymizer.of_settings(Settings(pseudonym_key=KEY))
    p = pseudonym("u1", KEY.encode())
    assert on.on and on.of("u1") == p
    assert on.of_query("u1") == p and on.of_query(p) == p  # a pseudonym is taken as it is
    assert on.of(p) != p  # at ingest every id is hashed, pseudonym-shaped or not


def test_the_key_is_a_secret_in_settings():
    s = Settings(pseudonym_key=KEY)
    assert KEY not in repr(s) and KEY not in s.model_dump_json()
    assert s.pseudonym_key.get_secret_value() == KEY
    assert Settings().pseudonym_key is None  # off by default


# --- ingest ---------------------------------------------------------------------


class _Dlq:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, dict]] = []

    async def send(self, *, key, value, force):
        self.sent.append((key, json.loads(value)))
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut


def _redis_bytes(url: str, prefix: str) -> bytes:
    """Every key under ``prefix`` and everything each holds, as raw bytes."""
    raw = redis.Redis.from_url(url)
    out: list[bytes] = []
    try:
        for key in raw.scan_iter(match=f"{prefix}*", count=1000):
            out.append(key)
            kind = raw.type(key).decode()
            if kind == "string":
                out.append(raw.get(key))
            elif kind == "hash":
                out.extend(b for kv in raw.hgetall(key).items() for b in kv)
            elif kind == "set":
                out.extend(raw.smembers(key))
            elif kind == "zset":
                out.extend(m for m, _ in raw.zrange(key, 0, -1, withscores=True))
            elif kind == "list":
                out.extend(raw.lrange(key, 0, -1))
            elif kind == "stream":
                out.extend(b for _, fields in raw.xrange(key) for kv in fields.items() for b in kv)
            else:
                raise AssertionError(f"unexpected Redis type {kind} of {key!r}")
    finally:
        raw.close()
    return b"\x00".join(out)


def keyed(keys: Keys) -> Keys:
    """``keys`` under the id scheme of KEY (what every process with that key uses)."""
    return Keys(keys.prefix, keys.shards, id_scheme(KEY))


async def _ingest(redis_client, keys, pseudonyms: Pseudonymizer) -> tuple[RedisSequenceStore, _Dlq]:
    store = RedisSequenceStore(redis_client, keys)
    dlq = _Dlq()
    writer = BatchWriter(store, dlq, pseudonyms=pseudonyms)
    array = b"[" + _message(RAW[0], "i3") + b"," + _message(RAW[1], "i4") + b"]"
    batch = [
        (0, 0, RAW[0].encode(), _message(RAW[0], "i1")),
        (0, 1, RAW[1].encode(), _message(RAW[1], "i2")),
        (1, 0, None, array),
        (1, 1, RAW[2].encode(), _message(RAW[2], "i5")),
        (1, 2, RAW[2].encode(), b'{"user_id": "raw-dave", "item_id": 5}'),  # dead letter
    ]
    try:
        res = await writer.write(TOPIC, batch)
    finally:
        writer.close()
    assert (res.applied, res.dead_lettered, res.users) == (5, 1, 3)
    return store, dlq


@pytest.mark.integration  # real Redis
async def test_ingest_stores_pseudonyms_and_no_raw_id(redis_client, keys, redis_url, redis_prefix):
    on = Pseudonymizer(KEY)
    store, dlq = await _ingest(redis_client, keyed(keys), on)
    by_user = dict(zip(RAW, store.read_many([on.of(u) for u in RAW]), strict=True))
    assert [b.item_id for b in by_user[RAW[0]]] == ["i1", "i3"]
    assert [b.item_id for b in by_user[RAW[1]]] == ["i2", "i4"]
    assert [b.item_id for b in by_user[RAW[2]]] == ["i5"]
    assert store.read_many(RAW) == [[], [], []]  # nothing under the raw ids
    stored = _redis_bytes(redis_url, redis_prefix)
    assert on.of(RAW[0]).encode() in stored  # the scan sees the ids it looks for
    for user in [*RAW, "raw-"]:
        assert user.encode() not in stored, f"{user!r} reached Redis"
    # what stays in Kafka (documented): the dead letter's key and raw payload
    [(key, record)] = dlq.sent
    assert key == RAW[2].encode() and "raw-dave" in record["payload"]


@pytest.mark.integration  # real Redis
async def test_ingest_without_a_key_stores_raw_ids(redis_client, keys, redis_url, redis_prefix):
    store, _ = await _ingest(redis_client, keys, Pseudonymizer(None))
    assert [b.item_id for b in store.read_many([RAW[0]])[0]] == ["i1", "i3"]
    assert RAW[0].encode() in _redis_bytes(redis_url, redis_prefix)


# --- the API --------------------------------------------------------------------


@pytest.fixture
def api(tmp_path, redis_client, keys, redis_prefix, redis_url):
    """An app with PSEUDONYM_KEY, u0's planted neighbours embedded under pseudonyms."""
    on = Pseudonymizer(KEY)
    settings = Settings(
        data_dir=tmp_path, redis_prefix=redis_prefix, redis_url=redis_url, pseudonym_key=KEY
    )
    # the stores record the id scheme: a writer keyed otherwise (or not) is refused
    embeddings = RedisEmbeddingStore(redis_client, Keys.of_settings(settings), feed_maxlen=1000)
    rng = np.random.default_rng(5)
    base = rng.standard_normal(16).astype(np.float32)
    vecs = {"u0": base}
    for name, noise in (("n1", 0.05), ("n2", 0.2), ("n3", 0.4)):
        vecs[name] = base + noise * rng.standard_normal(16).astype(np.float32)
    for i in range(20):
        vecs[f"o{i}"] = rng.standard_normal(16).astype(np.float32)
    vecs = {u: v / np.linalg.norm(v) for u, v in vecs.items()}
    embeddings.upsert([on.of(u) for u in vecs], np.stack(list(vecs.values())), version=2)
    embeddings.set_model_info(ModelInfo(2, "ckpt-2.pt", items=5, updated_at=1.7e9, loss=0.5))
    with TestClient(create_app(settings, redis_client=redis_client)) as client:
        assert client.app.state.ctx.follower.wait_for(embeddings.feed_head(), timeout=5)
        yield client, on


@pytest.mark.integration  # real Redis
def test_raw_id_and_pseudonym_answer_the_same(api):
    client, on = api
    by_raw = client.get("/users/u0/similar", params={"k": 3})
    assert by_raw.status_code == 200, by_raw.text
    by_pseudonym = client.get(f"/users/{on.of('u0')}/similar", params={"k": 3})
    assert by_pseudonym.status_code == 200, by_pseudonym.text
    raw, pseu = by_raw.json(), by_pseudonym.json()
    assert raw["user_id"] == "u0" and pseu["user_id"] == on.of("u0")  # echoes the caller
    assert raw["neighbors"] == pseu["neighbors"]
    assert [n["user_id"] for n in raw["neighbors"]] == [on.of(u) for u in ("n1", "n2", "n3")]
    # a neighbour id handed back is answered as that user
    again = client.get(f"/users/{raw['neighbors'][0]['user_id']}/embedding")
    assert again.status_code == 200 and again.json()["user_id"] == on.of("n1")
    emb = client.get("/users/n1/embedding").json()
    assert emb["user_id"] == "n1" and emb["embedding"] == again.json()["embedding"]


@pytest.mark.integration  # real Redis
def test_delete_with_the_raw_id_erases_the_pseudonyms_state(api):
    client, on = api
    r = client.delete("/users/n1")
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["user_id"] == on.of("n1") and report["found"] is True  # names no raw id
    assert report["embeddings"]["embedding"] == 1 and "n1" not in json.dumps(report)
    assert client.get("/users/n1/embedding").status_code == 404
    assert client.get(f"/users/{on.of('n1')}/embedding").status_code == 404
    names = [n["user_id"] for n in client.get("/users/u0/similar").json()["neighbors"]]
    assert on.of("n1") not in names and on.of("n2") in names


@pytest.mark.integration  # real Redis
async def test_cli_forget_with_the_raw_id_erases_the_pseudonym(
    tmp_path, redis_client, keys, redis_url, redis_prefix, monkeypatch, capsys
):
    from userstream.cli import main

    on = Pseudonymizer(KEY)
    store, _ = await _ingest(redis_client, keyed(keys), on)
    for name, value in {"REDIS_URL": redis_url, "REDIS_PREFIX": redis_prefix,
                        "PSEUDONYM_KEY": KEY, "DATA_DIR": str(tmp_path)}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("USERSTREAM_CONFIG", raising=False)
    assert main(["forget", RAW[0], "--wait", "0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["user_id"] == on.of(RAW[0]) and report["sequences"]["behaviors"] == 2
    assert RAW[0] not in json.dumps(report)
    assert [len(seq) for seq in store.read_many([on.of(u) for u in RAW])] == [0, 2, 1]


@pytest.mark.integration  # real Redis
def test_a_process_with_another_key_or_none_is_refused(redis_client, keys):
    """The stores record the id scheme (a fingerprint of the key, not the key): a
    worker started without PSEUDONYM_KEY, or with another, cannot write a second
    set of ids beside the first."""
    from userstream.types import Event

    RedisSequenceStore(redis_client, keyed(keys)).apply_many("t", [(0, 0, Event(
        pseudonym("u1", KEY.encode()), "i1", "view", 1.0))])  # fmt: skip
    assert id_scheme(KEY) != id_scheme(KEY + "x") and KEY not in id_scheme(KEY)
    for other in (keys, Keys(keys.prefix, keys.shards, id_scheme(KEY + "x"))):
        with pytest.raises(ValueError, match="same PSEUDONYM_KEY"):
            RedisSequenceStore(redis_client, other).read_many(["u1"])
