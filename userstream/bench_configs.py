"""Options of benchmarks whose code imports torch, kept apart so that building
the command line (every ``userstream`` command does) does not import it: a
stream worker started by the supervisor then starts in about a second.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["TrainBenchConfig"]


class TrainBenchConfig(BaseModel):
    """``userstream bench train`` (:mod:`model.step_bench`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    items: int = Field(10_000, ge=100, description="catalogue of the base runs")
    large_items: int = Field(100_000, ge=100, description="catalogue of the large runs")
    users: int = Field(2_000, ge=10, description="synthetic users (full windows)")
    steps: int = Field(20, ge=1, description="timed steps per figure")
    warmup: int = Field(3, ge=0, description="untimed steps first")
    seed: int = Field(0)
