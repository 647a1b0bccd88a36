"""The replay sample of the training worker: older users kept for replay.

Each cycle trains on the dirty users plus a sample of this reservoir, so the
model does not forget users who are quiet right now. The reservoir is saved
with every checkpoint (``Trainer.extra["reservoir"]``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

__all__ = ["Reservoir"]


class Reservoir:
    """Algorithm R over the stream of dirty user ids (a uniform sample of size k).

    A user already in the sample is not added twice; users who come back often
    are offered more often, so the sample leans slightly towards active users,
    which is fine for replay.
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size = size
        self.seen = 0
        self.users: list[str] = []
        self._members: set[str] = set()
        self._rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.users)

    def add_many(self, user_ids: Sequence[str]) -> None:
        for u in user_ids:
            if u in self._members or self.size == 0:
                continue
            self.seen += 1
            if len(self.users) < self.size:
                self.users.append(u)
                self._members.add(u)
                continue
            j = self._rng.randrange(self.seen)
            if j < self.size:
                self._members.discard(self.users[j])
                self.users[j] = u
                self._members.add(u)

    def remove_many(self, user_ids: Sequence[str]) -> int:
        """Take forgotten users out of the sample (their slots free up; ``seen`` is
        kept, so later users enter with the same odds); returns how many were in."""
        gone = self._members.intersection(user_ids)
        if gone:
            self.users = [u for u in self.users if u not in gone]
            self._members -= gone
        return len(gone)

    def sample(self, k: int, exclude: set[str]) -> list[str]:
        pool = [u for u in self.users if u not in exclude]
        return self._rng.sample(pool, min(k, len(pool)))

    def state_dict(self) -> dict:
        return {"size": self.size, "seen": self.seen, "users": list(self.users)}

    def load_state_dict(self, state: dict) -> None:
        self.seen = int(state["seen"])
        self.users = [str(u) for u in state["users"]][: self.size]
        self._members = set(self.users)
