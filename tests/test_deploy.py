"""docker-compose.yml cannot run here (no Docker engine), so check it against the code:
every userstream service runs an existing CLI command, every environment variable is
a known setting with a valid value, and ports and topic names agree."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from userstream.cli import build_parser
from userstream.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _userstream_services(compose: dict) -> dict[str, dict]:
    return {
        name: svc
        for name, svc in compose["services"].items()
        if svc.get("image", "").startswith("userstream") or "build" in svc
    }


def _cli_commands() -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return set(sub.choices)


def test_expected_services_exist(compose):
    services = compose["services"]
    for name in ("kafka", "redis", "stream-worker", "train-worker", "train-worker-gpu", "api"):
        assert name in services, f"docker-compose.yml lacks service {name}"
    assert services["kafka"]["image"].startswith("apache/kafka")
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert services["redis"]["image"].startswith("redis")
    assert "--appendonly" in services["redis"]["command"]


def test_commands_exist_in_cli(compose):
    commands = _cli_commands()
    services = _userstream_services(compose)
    assert len(services) >= 4
    for name, svc in services.items():
        cmd = svc["command"]
        assert cmd[0] == "userstream", f"{name}: command must run the userstream CLI"
        assert cmd[1] in commands, f"{name}: 'userstream {cmd[1]}' is not a CLI command"


def test_environment_is_known_settings(compose):
    known = {name.upper() for name in Settings.model_fields}
    for name, svc in _userstream_services(compose).items():
        env = svc["environment"]
        unknown = set(env) - known
        assert not unknown, f"{name}: unknown settings {sorted(unknown)}"
        # the values must validate as settings too
        settings = Settings(**{k.lower(): v for k, v in env.items()})
        assert settings.kafka_bootstrap_servers


def test_ports_and_topics_agree(compose):
    services = compose["services"]
    kafka_env = services["kafka"]["environment"]
    advertised = kafka_env["KAFKA_ADVERTISED_LISTENERS"].split("//", 1)[1]
    defaults = Settings()
    for name, svc in _userstream_services(compose).items():
        env = svc["environment"]
        assert env["KAFKA_BOOTSTRAP_SERVERS"] == advertised, name
        assert "REDIS_URL" not in env and svc["env_file"] == ["deploy/userstream.env"], name
        assert env.get("EVENTS_TOPIC", defaults.events_topic) == defaults.events_topic
        assert env.get("DLQ_TOPIC", defaults.dlq_topic) == defaults.dlq_topic
        assert int(env["TOPIC_PARTITIONS"]) == int(kafka_env["KAFKA_NUM_PARTITIONS"])
    api = services["api"]
    port = int(api["environment"]["API_PORT"])
    assert f"{port}:{port}" in api["ports"]
    assert api["environment"]["API_HOST"] == "0.0.0.0"


def test_gpu_reservation_is_switchable(compose):
    services = compose["services"]
    gpu = services["train-worker-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert services["train-worker"]["profiles"] == ["cpu"]
    assert "deploy" not in services["train-worker"]
    assert gpu["environment"]["DEVICE"] == "cuda"


def _example_env() -> dict[str, str]:
    lines = (ROOT / "deploy" / "userstream.env.example").read_text().splitlines()
    return dict(ln.split("=", 1) for ln in lines if ln.strip() and not ln.startswith("#"))


def test_secrets_come_from_a_git_ignored_env_file_and_only_the_api_is_published(compose):
    example = _example_env()
    password = example["REDIS_PASSWORD"]
    assert example["REDIS_URL"] == f"redis://:{password}@redis:6379/0"
    settings = Settings(**{k.lower(): v for k, v in example.items() if k != "REDIS_PASSWORD"})
    assert settings.api_tokens and "sha256:" in settings.api_tokens  # hashes, not tokens
    assert "deploy/userstream.env" in (ROOT / ".gitignore").read_text().splitlines()
    services = compose["services"]
    redis = services["redis"]
    assert redis["command"][-2:] == ["--requirepass", redis["command"][-1]]
    assert "REDIS_PASSWORD" in redis["command"][-1] and "REDIS_PASSWORD" in str(
        redis["healthcheck"]
    )
    for name in ("kafka", "redis"):
        assert "ports" not in services[name], f"{name} must not be published outside the network"
    assert "/readyz" in " ".join(services["api"]["healthcheck"]["test"])
