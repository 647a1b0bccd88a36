"""Sub-commands for operators: ``userstream token`` and ``userstream forget ID``."""

from __future__ import annotations

import json
import time
from typing import Any

from userstream.cli.common import resolved_settings

__all__ = ["add_commands"]


def _cmd_token(args: Any) -> int:
    from userstream.tokens import hash_line, new_token

    token = new_token()
    print(f"token (give it to the client; it is not stored anywhere): {token}")
    print(
        f"settings entry (API_TOKENS, comma-separated with others): {hash_line(token, args.scope)}"
    )
    return 0


def _cmd_forget(args: Any) -> int:
    from userstream.pseudonyms import Pseudonymizer
    from userstream.stores import (
        RedisEmbeddingStore,
        RedisSequenceStore,
        connect_settings,
        forget_user,
    )
    from userstream.types import Keys

    settings = resolved_settings()
    client = connect_settings(settings)
    try:
        keys = Keys.of_settings(settings)
        embeddings = RedisEmbeddingStore(client, keys, settings.update_feed_maxlen)
        sequences = RedisSequenceStore(client, keys, settings.sequence_length)
        # with PSEUDONYM_KEY the stores hold the id's pseudonym (the report names it)
        user_id = Pseudonymizer.of_settings(settings).of_query(args.user_id)
        report = forget_user(sequences, embeddings, user_id)
        report["index_applied"] = _wait_for_replicas(embeddings, report, args.wait)
    finally:
        client.close()
    print(json.dumps(report, indent=2))
    return 0


def _wait_for_replicas(embeddings: Any, report: dict, wait_s: float) -> dict[str, bool]:
    """Per API replica (as reported on the feed), whether it applied the tombstones
    within ``wait_s`` (replicas report their position every 2 s)."""
    tombstones = report["embeddings"]["tombstones"]
    if not tombstones:
        return {}

    def key(stream_id: str) -> tuple[int, int]:
        ms, _, seq = stream_id.partition("-")
        return int(ms), int(seq or 0)

    last = key(tombstones[-1])
    deadline = time.monotonic() + wait_s
    while True:
        done = {name: key(at) >= last for name, (at, _) in embeddings.followers().items()}
        if all(done.values()) or time.monotonic() >= deadline:
            return done
        time.sleep(0.5)


def add_commands(sub: Any) -> None:
    token = sub.add_parser("token", help="print a new API token and its API_TOKENS entry")
    token.add_argument("--scope", choices=("read", "admin"), default="read")
    token.set_defaults(func=_cmd_token)
    forget = sub.add_parser(
        "forget", help="erase a user everywhere (stores, feed, indexes, checkpoints); JSON report"
    )
    forget.add_argument("user_id")
    forget.add_argument(
        "--wait", type=float, default=10.0, help="seconds to wait for API replicas to apply it"
    )
    forget.set_defaults(func=_cmd_forget)
