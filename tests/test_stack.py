"""`userstream up`: start-up checks and start-up failures (the supervision itself:
tests/test_stack_supervisor.py)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import uuid

import pytest

from userstream import stack as stack_module
from userstream.embedded import free_port
from userstream.settings import Settings
from userstream.stack import Stack, run_stack
from userstream.supervisor import log_tail


def test_log_tail_is_indented_and_a_missing_log_says_so(tmp_path):
    log = tmp_path / "crasher.log"
    with open(log, "wb") as fh:
        code = "import sys; print('boom: bad config'); sys.exit(3)"
        subprocess.run([sys.executable, "-c", code], stdout=fh, stderr=subprocess.STDOUT)
    assert log_tail(log) == "    boom: bad config"
    assert log_tail(tmp_path / "absent.log") == "(no log)"


def test_external_redis_that_does_not_answer_is_a_clear_error(tmp_path, caplog):
    stack = Stack(
        Settings(
            data_dir=tmp_path,
            kafka_bootstrap_servers="127.0.0.1:1",
            redis_url="redis://127.0.0.1:1/0",
        )
    )
    caplog.set_level(logging.INFO)
    try:
        stack._start_infra()
    except SystemExit as exc:
        assert "REDIS_URL=redis://127.0.0.1:1/0 does not answer" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("an unreachable REDIS_URL must stop the stack")
    assert "using external Kafka at 127.0.0.1:1" in caplog.text


@pytest.mark.integration
def test_an_api_that_never_listens_fails_the_start(
    tmp_path, broker, redis_url, monkeypatch, caplog
):
    # the children read the same settings from the environment
    run = uuid.uuid4().hex[:8]
    env = {
        "DATA_DIR": str(tmp_path),
        "KAFKA_BOOTSTRAP_SERVERS": broker,
        "REDIS_URL": redis_url,
        "REDIS_PREFIX": f"stack-{run}:",
        "EVENTS_TOPIC": f"stack-{run}",
        "DLQ_TOPIC": f"stack-{run}-dlq",
        "STREAM_APP_ID": f"stack-{run}",
        "API_PORT": str(free_port()),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(stack_module, "API_START_TIMEOUT_S", 0.5)
    caplog.set_level(logging.INFO)

    assert run_stack(Settings()) == 1
    assert "could not start: the API did not listen on 127.0.0.1:" in caplog.text
    state = json.loads((tmp_path / "supervisor.json").read_text())
    assert state["state"] == "stopped"
    assert set(state["children"]) == {"stream-worker", "train-worker", "api"}
    assert not any(c["up"] for c in state["children"].values())
