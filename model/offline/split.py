"""Leave-one-out split of PROTOCOL section 1.

For each user with ``n >= 3`` behaviors ``s_1..s_n`` (oldest first):

* train on ``s_1..s_{n-2}`` (every prefix of it is a next-item example),
* validate: predict ``s_{n-1}`` from ``s_1..s_{n-2}``,
* test: predict ``s_n`` from ``s_1..s_{n-1}``.

Users with fewer than three behaviors are left out of every part.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from userstream.types import Behavior

__all__ = ["LeaveOneOut", "leave_one_out"]

MIN_LEN = 3


@dataclass(frozen=True)
class LeaveOneOut:
    users: list[str]
    full: list[list[Behavior]]  # s_1..s_n per user, aligned with ``users``

    def __len__(self) -> int:
        return len(self.users)

    @property
    def train(self) -> list[list[Behavior]]:
        """s_1..s_{n-2}: training sequences, also the validation inputs."""
        return [s[:-2] for s in self.full]

    @property
    def train_lengths(self) -> list[int]:
        """Length of each training sequence (``train``) without copying it."""
        return [len(s) - 2 for s in self.full]

    @property
    def valid(self) -> tuple[list[list[Behavior]], list[Behavior]]:
        """(inputs s_1..s_{n-2}, targets s_{n-1})."""
        return [s[:-2] for s in self.full], [s[-2] for s in self.full]

    @property
    def test(self) -> tuple[list[list[Behavior]], list[Behavior]]:
        """(inputs s_1..s_{n-1}, targets s_n)."""
        return [s[:-1] for s in self.full], [s[-1] for s in self.full]

    def items(self) -> list[str]:
        """Every item of the data set (targets included), in order of first sight."""
        seen: dict[str, None] = {}
        for s in self.full:
            for b in s:
                seen.setdefault(b.item_id, None)
        return list(seen)


def leave_one_out(sequences: Mapping[str, Sequence[Behavior]]) -> LeaveOneOut:
    """Keep users with at least three behaviors, in the mapping's order."""
    users = [u for u, s in sequences.items() if len(s) >= MIN_LEN]
    return LeaveOneOut(users, [list(sequences[u]) for u in users])
