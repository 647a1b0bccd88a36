"""Redis bytes per user: a full rolling sequence (200 behaviors) plus its
embedding, written the way the service writes them, against the same behaviors
as tab-separated text in a Redis list (the stored form before ``packed-1``) in
the same run.

    python benchmarks/redis_memory.py [--users 5000] [--length 200] [--hidden 64] [--shards 1]

A bundled redis-server of its own (nothing else in it) so ``used_memory`` moves
only with what this script writes; items are drawn Zipf-like from a catalogue
of ``--items`` ids like Amazon's (10 characters). Reports bytes per user for the sequence store
alone, with the embedding and ids added, and for the text baseline; the item
dictionary (per item, shared by all users) separately.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import write_json


def used(client) -> int:
    return int(client.info("memory")["used_memory"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=5000)
    ap.add_argument("--length", type=int, default=200)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--items", type=int, default=5000, help="catalogue size")
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--server", default=None,
                    help="a redis-server binary to run (default: the bundled one, libc malloc; "
                    "e.g. /usr/bin/redis-server for Debian's, jemalloc)")  # fmt: skip
    args = ap.parse_args()

    from userstream.embedded import free_port, start_redis
    from userstream.stores import RedisEmbeddingStore, RedisSequenceStore, connect
    from userstream.types import Event, Keys

    work = Path(tempfile.mkdtemp(prefix="redis-memory-"))
    port = free_port()
    if args.server:
        import subprocess

        from userstream.embedded import wait_for_port

        proc = subprocess.Popen([args.server, "--port", str(port), "--bind", "127.0.0.1",
                                 "--save", "", "--appendonly", "no", "--dir", str(work)],
                                stdout=subprocess.DEVNULL)  # fmt: skip
        wait_for_port("127.0.0.1", port, proc=proc)
    else:
        proc = start_redis(port, work, work / "redis.log")
    try:
        client = connect(f"redis://127.0.0.1:{port}/0")
        client.config_set("appendonly", "no")
        rng = np.random.default_rng(0)
        items = [f"B{n:09d}" for n in range(args.items)]
        behaviors = ["view", "click", "cart", "fav", "purchase"]
        users = [f"user-{n:07d}" for n in range(args.users)]
        keys = Keys("mem:", args.shards)
        store = RedisSequenceStore(client, keys, max_len=args.length)
        base = used(client)
        t0 = time.perf_counter()
        offset = 0
        for start in range(0, len(users), 50):
            batch = []
            for u in users[start : start + 50]:
                picks = rng.zipf(1.2, args.length) % len(items)
                for k, i in enumerate(picks):
                    batch.append(
                        (0, offset, Event(u, items[i], behaviors[k % 5], 1.7e9 + k * 37.5))
                    )
                    offset += 1
            store.apply_many("t", batch)
        store.take_dirty(len(users))  # the queues drain in service; count sequences only
        store.release_claimed(users)
        store.take_dirty(len(users), "embed")
        store.release_claimed(users, "embed")
        dictionaries = sum(int(client.memory_usage(k, samples=0) or 0) for kind in ("item", "behavior")
                           for k in keys.dictionary(kind))  # fmt: skip
        n_items = store.num_items()
        seq_bytes = used(client) - base - dictionaries
        emb = RedisEmbeddingStore(client, keys)
        vecs = rng.normal(size=(len(users), args.hidden)).astype(np.float32)
        for start in range(0, len(users), 1000):
            part = users[start : start + 1000]
            emb.upsert(part, vecs[start : start + 1000], version=1, event_ts=[1.7e9] * len(part))
        client.delete(keys.updates)  # the feed is trimmed to what followers applied
        with_emb = used(client) - base - dictionaries
        per_kind: dict[str, int] = {}
        for key in client.scan_iter(count=1000):
            kind = key.rsplit("}:", 1)[-1].split(":", 1)[0]
            per_kind[kind] = per_kind.get(kind, 0) + int(client.memory_usage(key, samples=0) or 0)
        wrote_s = time.perf_counter() - t0

        # the baseline: the same behaviors as "item\tbehavior\tts" strings in a list
        client.flushall()
        base = used(client)
        rng = np.random.default_rng(0)
        pipe = client.pipeline(transaction=False)
        for u in users:
            picks = rng.zipf(1.2, args.length) % len(items)
            pipe.rpush(f"mem:seq:{u}", *(f"{items[i]}\t{behaviors[k % 5]}\t{1.7e9 + k * 37.5:.3f}"
                                         for k, i in enumerate(picks)))  # fmt: skip
            pipe.sadd("mem:users", u)
        pipe.execute()
        text_bytes = used(client) - base
        report = {
            "users": args.users,
            "behaviors_per_user": args.length,
            "hidden_size": args.hidden,
            "shards": args.shards,
            "allocator": client.info("memory").get("mem_allocator"),
            "redis_version": client.info("server").get("redis_version"),
            "packed_sequence_bytes_per_user": round(seq_bytes / args.users),
            "packed_with_embedding_bytes_per_user": round(with_emb / args.users),
            "text_list_bytes_per_user": round(text_bytes / args.users),
            "packed_vs_text_ratio": round(seq_bytes / text_bytes, 3),
            "dictionary_items": n_items,
            "dictionary_bytes_per_item": round(dictionaries / max(1, n_items)),
            "write_s": round(wrote_s, 1),
            "memory_usage_bytes_per_user_by_key": {
                k: round(v / args.users) for k, v in sorted(per_kind.items())
            },
        }
        for k, v in report.items():
            print(f"{k}: {v}")
        write_json("redis_memory", report)
        client.close()
    finally:
        proc.kill()
        proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
