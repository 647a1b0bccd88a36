"""The `up` supervisor: a dead child is reported with its log, and stops the stack."""

from __future__ import annotations

import logging
import subprocess
import sys

from userstream.settings import Settings
from userstream.stack import Stack, _Child, _tail


def _child(tmp_path, name: str, code: str, essential: bool = True) -> _Child:
    log = tmp_path / f"{name}.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=fh, stderr=subprocess.STDOUT)
    return _Child(name, proc, log, essential)


def test_dead_child_is_found_and_its_log_tail_shown(tmp_path):
    stack = Stack(Settings(data_dir=tmp_path))
    alive = _child(tmp_path, "alive", "import time; time.sleep(30)")
    dead = _child(tmp_path, "crasher", "import sys; print('boom: bad config'); sys.exit(3)")
    stack.children += [alive, dead]
    dead.proc.wait(10)
    found = stack.dead_child()
    assert found is dead and found.proc.returncode == 3
    assert "boom: bad config" in _tail(found.log_path)
    stack.stop()
    assert alive.proc.poll() is not None  # stop() terminated the survivor


def test_finished_optional_child_is_not_an_error(tmp_path):
    stack = Stack(Settings(data_dir=tmp_path))
    done = _child(tmp_path, "demo-producer", "pass", essential=False)
    done.proc.wait(10)
    stack.children.append(done)
    assert stack.dead_child() is None
    failed = _child(tmp_path, "demo-producer2", "raise SystemExit(2)", essential=False)
    failed.proc.wait(10)
    stack.children.append(failed)
    assert stack.dead_child() is failed


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
