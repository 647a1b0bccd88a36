"""The supervisor of `userstream up`: restarts with backoff, supervisor.json, bounded stops.

Unit tests run a real :class:`Supervisor` over small Python child processes: a
driver process (:data:`DRIVER`) calls ``Supervisor.serve`` as ``run_stack``
does, so signals are real. The integration test kills workers and the broker
of a real ``python -m userstream up`` and stops it with SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.helpers import kill_leftovers, produce_raw, running_stack, stack_logs, wait_until
from userstream.supervisor import Supervisor, command_child

DRIVER = """
import json, logging, sys
from pathlib import Path
from userstream.supervisor import Supervisor, command_child

cfg = json.loads(sys.argv[1])
logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                    format="%(asctime)s %(levelname)s %(message)s")
sup = Supervisor(Path(cfg["state"]), **cfg["options"])
children = [
    command_child(c["name"], c.get("argv") or [sys.executable, "-c", c["code"]], Path(c["log"]),
                  grace_s=c.get("grace_s", 5.0), follows=c.get("follows"))
    for c in cfg["children"]
]
sys.exit(sup.serve(lambda: [sup.launch(c) for c in children]))
"""

STEADY = "import time\nprint('ready', flush=True)\nwhile True: time.sleep(0.05)"


def once(flag: Path, code: int, message: str) -> str:
    """A child that exits with ``code`` the first time it runs, then keeps running."""
    return (
        "import os, sys, time\n"
        f"if not os.path.exists({str(flag)!r}):\n"
        f"    open({str(flag)!r}, 'w').close(); print({message!r}, flush=True); sys.exit({code})\n"
        "while True: time.sleep(0.05)"
    )


def records_starts(path: Path, run_s: float = 0.0) -> str:
    """A child that appends its start time to ``path``, runs ``run_s`` and fails."""
    return (
        "import sys, time\n"
        f"open({str(path)!r}, 'a').write(repr(time.time()) + '\\n')\n"
        f"time.sleep({run_s})\n"
        "sys.exit(1)"
    )


def records_sigterm(path: Path, linger_s: float = 0.0) -> str:
    """A child that, on SIGTERM, waits ``linger_s``, writes the time to ``path`` and exits 0."""
    return (
        "import signal, sys, time\n"
        "def stop(*_):\n"
        f"    time.sleep({linger_s}); open({str(path)!r}, 'w').write(repr(time.time())); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "print('ready', flush=True)\n"
        "while True: time.sleep(0.05)"
    )


STUBBORN = (
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ready', flush=True)\n"
    "while True: time.sleep(0.05)"
)


class Driven:
    """A driver process running a Supervisor, and what it writes."""

    def __init__(self, proc: subprocess.Popen, tmp_path: Path) -> None:
        self.proc = proc
        self.tmp_path = tmp_path
        self.state_path = tmp_path / "supervisor.json"
        self.out_path = tmp_path / "supervisor.out"

    def state(self) -> dict[str, Any]:
        return json.loads(self.state_path.read_text())

    def child(self, name: str) -> dict[str, Any]:
        return self.state()["children"][name]

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def wait(self, check, what: str, timeout_s: float = 20.0, alive: bool = True):
        return wait_until(
            check,
            timeout_s,
            what,
            self.proc if alive else None,
            ignore=(FileNotFoundError, KeyError, ValueError),
            details=lambda: "\n--- supervisor ---\n" + self.output(),
        )

    def wait_ready(self, *names: str) -> None:
        def ready() -> bool:
            return all("ready" in (self.tmp_path / f"{n}.log").read_text() for n in names)

        self.wait(ready, f"{names} to be ready")


@contextmanager
def supervised(tmp_path: Path, children: list[dict[str, Any]], **options: Any):
    for c in children:
        c.setdefault("log", str(tmp_path / f"{c['name']}.log"))
    cfg = {
        "state": str(tmp_path / "supervisor.json"),
        "options": {"backoff_initial_s": 0.2, "backoff_max_s": 1.6, **options},
        "children": children,
    }
    out = open(tmp_path / "supervisor.out", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, json.dumps(cfg)],
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    run = Driven(proc, tmp_path)
    try:
        yield run
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        out.close()
        kill_leftovers(run.state_path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _gaps(path: Path) -> list[float]:
    times = [float(line) for line in path.read_text().split()]
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def test_a_dead_child_is_restarted_and_counted_in_supervisor_json(tmp_path):
    children = [
        {"name": "steady", "code": STEADY},
        {"name": "crasher", "code": once(tmp_path / "c.flag", 3, "boom: bad config")},
        {"name": "quitter", "code": once(tmp_path / "q.flag", 0, "nothing to do")},
    ]
    with supervised(tmp_path, children) as run:

        def back(name: str) -> bool:
            c = run.child(name)
            return c["restarts"] == 1 and c["up"]

        run.wait(lambda: back("crasher") and back("quitter"), "crasher and quitter restarted")
        crasher, quitter = run.child("crasher"), run.child("quitter")
        assert (crasher["last_exit"]["code"], crasher["last_exit"]["signal"]) == (3, None)
        assert quitter["last_exit"]["code"] == 0  # exit 0 while running is restarted too
        assert crasher["pid"] != crasher["last_exit"]["pid"]
        assert crasher["last_restart_at"] >= crasher["last_exit"]["at"]

        steady = run.child("steady")
        assert steady["restarts"] == 0 and steady["last_exit"] is None
        os.kill(steady["pid"], signal.SIGKILL)
        run.wait(lambda: back("steady"), "steady restarted after SIGKILL")
        again = run.child("steady")
        assert again["pid"] != steady["pid"]
        assert (again["last_exit"]["code"], again["last_exit"]["signal"]) == (None, "SIGKILL")

        state = run.state()
        assert state["pid"] == run.proc.pid and state["state"] == "running"
        out = run.output()
        assert f"crasher (pid {crasher['last_exit']['pid']}) exited with code 3" in out
        assert "restart 1 in 0.2s" in out
        assert "boom: bad config" in out  # the tail of its log
        assert f"steady (pid {steady['pid']}) ended by SIGKILL" in out

        run.proc.send_signal(signal.SIGTERM)
        assert run.proc.wait(15) == 0
    assert not any(_alive(c["pid"]) for c in (crasher, quitter, again))


def test_a_child_that_keeps_crashing_backs_off(tmp_path):
    starts = tmp_path / "starts"
    children = [{"name": "crashloop", "code": records_starts(starts)}]
    delays = [0.2, 0.4, 0.8, 1.6, 1.6]  # doubling from 0.2 s, capped at 1.6 s
    with supervised(tmp_path, children, backoff_initial_s=0.2, backoff_max_s=1.6) as run:
        run.wait(lambda: len(_gaps(starts)) >= len(delays), "six starts")
        waiting = run.wait(
            lambda: (c := run.child("crashloop"))["state"] == "waiting" and c, "a wait"
        )
        assert waiting["next_restart_at"] is not None and waiting["restarts"] >= len(delays)
        assert waiting["last_exit"]["code"] == 1
        run.proc.send_signal(signal.SIGTERM)
        assert run.proc.wait(15) == 0
    gaps = _gaps(starts)[: len(delays)]
    for gap, delay in zip(gaps, delays, strict=True):
        assert gap >= delay, (gaps, delays)
    assert gaps[3] > gaps[0] + 1.0, gaps  # it grew
    assert gaps[4] < 3.2, gaps  # and stopped growing at the cap


def test_backoff_starts_over_after_a_healthy_run(tmp_path):
    starts = tmp_path / "starts"
    # runs 0.6 s, longer than healthy_after_s: each death is a first failure again
    children = [{"name": "flaky", "code": records_starts(starts, run_s=0.6)}]
    with supervised(tmp_path, children, backoff_initial_s=0.3, healthy_after_s=0.5) as run:
        run.wait(lambda: len(_gaps(starts)) >= 4, "five starts")
        run.proc.send_signal(signal.SIGTERM)
        assert run.proc.wait(15) == 0
    gaps = _gaps(starts)[:4]
    assert all(gap >= 0.9 for gap in gaps), gaps
    # without the reset the fourth delay would be 2.4 s
    assert gaps[3] < 0.6 + 2.4, gaps


def test_sigterm_stops_in_reverse_order_and_kills_a_child_that_ignores_it(tmp_path):
    children = [
        {"name": "first", "code": records_sigterm(tmp_path / "first.t")},
        {"name": "stubborn", "code": STUBBORN, "grace_s": 1.0},
        {"name": "last", "code": records_sigterm(tmp_path / "last.t")},
    ]
    with supervised(tmp_path, children) as run:
        run.wait_ready("first", "stubborn", "last")
        pids = {n: c["pid"] for n, c in run.state()["children"].items()}
        t0 = time.time()
        run.proc.send_signal(signal.SIGTERM)
        assert run.proc.wait(15) == 0
        took = time.time() - t0
        state = run.state()
    assert 1.0 <= took < 6.0, took  # the stubborn child's grace, then SIGKILL
    first_t, last_t = (float((tmp_path / f"{n}.t").read_text()) for n in ("first", "last"))
    assert last_t < first_t  # reverse start order ...
    assert first_t - last_t >= 1.0  # ... and "first" waited for the stubborn one's grace
    assert state["state"] == "stopped"
    kids = state["children"]
    assert all(not c["up"] and c["pid"] is None and c["restarts"] == 0 for c in kids.values())
    assert kids["stubborn"]["last_exit"]["signal"] == "SIGKILL"
    assert kids["first"]["last_exit"]["code"] == kids["last"]["last_exit"]["code"] == 0
    assert f"killing stubborn (pid {pids['stubborn']})" in run.output()
    assert not any(_alive(p) for p in pids.values())


def test_a_second_signal_kills_what_is_left_at_once(tmp_path):
    children = [
        {"name": "stubborn1", "code": STUBBORN, "grace_s": 30.0},
        {"name": "stubborn2", "code": STUBBORN, "grace_s": 30.0},
    ]
    with supervised(tmp_path, children) as run:
        run.wait_ready("stubborn1", "stubborn2")
        t0 = time.monotonic()
        run.proc.send_signal(signal.SIGTERM)
        run.wait(lambda: run.state()["state"] == "stopping", "the stop to begin")
        run.proc.send_signal(signal.SIGINT)
        assert run.proc.wait(15) == 0
        took = time.monotonic() - t0
        kids = run.state()["children"]
    assert took < 10.0, took  # far below either grace
    assert all(c["last_exit"]["signal"] == "SIGKILL" for c in kids.values())
    assert "SIGINT again: killing what is left" in run.output()


def test_the_whole_stop_is_bounded(tmp_path):
    children = [
        {"name": "stubborn1", "code": STUBBORN, "grace_s": 30.0},
        {"name": "stubborn2", "code": STUBBORN, "grace_s": 30.0},
    ]
    with supervised(tmp_path, children, stop_timeout_s=1.0) as run:
        run.wait_ready("stubborn1", "stubborn2")
        t0 = time.monotonic()
        run.proc.send_signal(signal.SIGTERM)
        assert run.proc.wait(15) == 0
        took = time.monotonic() - t0
        kids = run.state()["children"]
    assert 1.0 <= took < 6.0, took
    assert all(c["last_exit"]["signal"] == "SIGKILL" for c in kids.values())
    assert "the stop took more than 1s" in run.output()


def test_followers_stop_with_what_they_follow_and_start_after_it(tmp_path):
    children = [
        {"name": "infra", "code": STEADY},
        # stops slowly: the infra must not start again before it is down
        {"name": "follower", "code": records_sigterm(tmp_path / "f.t", 0.5), "follows": "infra"},
        {"name": "other", "code": STEADY},
    ]
    with supervised(tmp_path, children, backoff_initial_s=1.5) as run:
        run.wait_ready("infra", "follower", "other")
        before = run.state()["children"]
        os.kill(before["infra"]["pid"], signal.SIGKILL)

        def back() -> bool:
            kids = run.state()["children"]
            return all(kids[n]["restarts"] == 1 and kids[n]["up"] for n in ("infra", "follower"))

        run.wait(back, "infra and its follower back")
        kids = run.state()["children"]
    infra, follower = kids["infra"], kids["follower"]
    assert follower["last_exit"]["code"] == 0  # asked to stop, and it did
    assert float((tmp_path / "f.t").read_text()) <= infra["started_at"]
    assert infra["started_at"] <= follower["started_at"]
    # the infra waited its backoff; the follower, stopped on purpose, did not wait again
    assert follower["started_at"] - infra["started_at"] < 1.5
    assert kids["other"]["pid"] == before["other"]["pid"] and kids["other"]["restarts"] == 0
    assert "stopping follower" in run.output()


def test_a_child_waits_for_what_it_needs(tmp_path):
    sup = Supervisor(tmp_path / "supervisor.json", backoff_initial_s=0.1, backoff_max_s=0.2)
    infra = sup.launch(command_child("infra", [sys.executable, "-c", STEADY], tmp_path / "i.log"))
    user = sup.launch(
        command_child("user", [sys.executable, "-c", STEADY], tmp_path / "u.log", needs=("infra",))
    )
    good_launch, tries = infra.launch, []

    def broken_launch() -> subprocess.Popen:  # an infrastructure that does not come up
        tries.append(time.monotonic())
        raise RuntimeError("does not listen")

    try:
        infra.launch = broken_launch
        infra.proc.kill()
        user.proc.kill()
        wait_until(lambda: sup.watch() or len(tries) >= 3, 20, "three failed infra starts")
        assert user.state == "waiting" and not user.up and user.restarts == 0
        on_file = json.loads(sup.state_path.read_text())["children"]["infra"]
        assert on_file["last_exit"]["error"] == "does not listen" and not on_file["up"]

        infra.launch = good_launch
        wait_until(lambda: sup.watch() or (infra.up and user.up), 20, "both back")
        assert user.started_at >= infra.started_at
        assert (infra.restarts, user.restarts) == (1, 1)
    finally:
        sup.stop()
    assert not infra.up and not user.up


def test_a_child_that_cannot_start_fails_the_start(tmp_path):
    children = [
        {"name": "steady", "code": STEADY},
        {"name": "missing", "argv": [str(tmp_path / "no-such-program")]},
    ]
    with supervised(tmp_path, children) as run:
        assert run.proc.wait(15) == 1
        state = run.state()
    assert "could not start" in run.output() and "no-such-program" in run.output()
    assert state["state"] == "stopped"
    assert not _alive(state["children"]["steady"]["last_exit"]["pid"])


# --- the real stack ------------------------------------------------------------


def real_stack(data_dir: Path, redis_url: str):
    """``python -m userstream up`` (tests.helpers.running_stack) with a tiny learner."""
    return running_stack(data_dir, redis_url, TRAIN_STEPS="2", HIDDEN_SIZE="32",
                         NUM_LAYERS="1", NUM_HEADS="2", DEVICE="cpu")  # fmt: skip


def _wait(stack, check, timeout_s: float, what: str):
    return wait_until(check, timeout_s, what, stack["proc"], poll_s=0.25,
                      details=lambda: stack_logs(stack["data_dir"], lines=25),
                      ignore=(httpx.HTTPError, OSError, KeyError, ValueError))  # fmt: skip


def _produce(env, user: str) -> None:
    event = {"user_id": user, "item_id": "i-1", "behavior": "view", "ts": time.time()}
    produce_raw(env, user.encode(), json.dumps(event).encode())


@pytest.mark.integration
@pytest.mark.slow
def test_the_real_stack_restarts_what_was_killed_and_stops_cleanly(tmp_path, redis_url):
    from stream.app import read_ready
    from stream.topics import admin_client
    from userstream.settings import Settings

    timings: dict[str, float] = {}
    with real_stack(tmp_path, redis_url) as st:
        client, env = st["client"], st["env"]
        settings = Settings(redis_prefix=env["REDIS_PREFIX"], data_dir=tmp_path)
        r = redis.Redis.from_url(redis_url, decode_responses=True)
        health = {"ok": 0, "not ok": 0}

        def kids() -> dict[str, Any]:
            # every wait below also asks the API: it must stay healthy throughout
            ok = client.get("/healthz").status_code == 200
            health["ok" if ok else "not ok"] += 1
            return st["state"]()["children"]

        def ready(pid: int) -> bool:
            return read_ready(r, settings, pid) is not None

        def counts() -> int:
            s = client.get("/stats").json()
            return s["events_ingested"] + s.get("events_duplicate_skipped", 0)

        first = kids()
        assert set(first) == {"broker", "stream-worker", "train-worker", "api"}
        assert all(c["up"] and c["restarts"] == 0 for c in first.values())
        _wait(st, lambda: ready(first["stream-worker"]["pid"]), 120, "the stream worker ready")

        # the training worker and the stream worker, killed outright
        t0 = time.monotonic()
        for name in ("train-worker", "stream-worker"):
            os.kill(first[name]["pid"], signal.SIGKILL)

        def back(name: str, restarts: int, old: dict) -> bool:
            c = kids()[name]
            return c["up"] and c["restarts"] == restarts and c["pid"] != old[name]["pid"]

        _wait(st, lambda: back("train-worker", 1, first) and back("stream-worker", 1, first),
              60, "both workers restarted")  # fmt: skip
        timings["workers: kill -> new pids"] = time.monotonic() - t0
        second = kids()
        assert second["train-worker"]["last_exit"]["signal"] == "SIGKILL"
        assert second["stream-worker"]["last_exit"]["signal"] == "SIGKILL"
        _wait(st, lambda: ready(second["stream-worker"]["pid"]), 120, "the new stream worker ready")
        timings["stream worker: kill -> ready"] = time.monotonic() - t0
        assert not ready(first["stream-worker"]["pid"])  # the killed one's field is gone

        user = f"after-kill-{uuid.uuid4().hex[:6]}"
        before = client.get("/stats").json()["events_ingested"]
        _produce(env, user)
        _wait(st, lambda: client.get("/stats").json()["events_ingested"] == before + 1, 60,
              "an event ingested by the new stream worker")  # fmt: skip
        _wait(st, lambda: client.get(f"/users/{user}/embedding").status_code == 200, 120,
              "the new training worker to embed the user")  # fmt: skip
        timings["workers: kill -> new user embedded"] = time.monotonic() - t0

        # the embedded broker: it comes back with its topics, and the stream worker after it
        t1 = time.monotonic()
        os.kill(second["broker"]["pid"], signal.SIGKILL)
        _wait(st, lambda: back("broker", 1, second) and back("stream-worker", 2, second), 120,
              "the broker and the stream worker restarted")  # fmt: skip
        timings["broker: kill -> broker and stream worker pids"] = time.monotonic() - t1
        third = kids()
        assert third["stream-worker"]["started_at"] >= third["broker"]["started_at"]
        assert third["stream-worker"]["last_exit"]["at"] <= third["broker"]["started_at"]
        admin = admin_client(f"127.0.0.1:{env['EMBEDDED_KAFKA_PORT']}")
        try:
            topics = {t["name"]: len(t["partitions"]) for t in admin.describe_topics()}
        finally:
            admin.close()
        assert topics["behavior-events"] == topics["behavior-events-dlq"] == 2
        _wait(st, lambda: ready(third["stream-worker"]["pid"]), 120, "the stream worker ready")
        timings["broker: kill -> stream worker ready"] = time.monotonic() - t1
        seen, stats = counts(), client.get("/stats").json()
        _produce(env, user)  # same key, same partition, offset 0 again in the new log
        # read from the new broker: ingested, or skipped as a duplicate until the stream
        # worker ties the stored offsets to their log (SequenceStore.bind_log)
        _wait(st, lambda: counts() == seen + 1, 60, "the event read from the new broker")
        after = client.get("/stats").json()
        outcome = {k: after[k] - stats[k] for k in ("events_ingested", "events_duplicate_skipped")}
        for name in ("api", "train-worker"):
            assert third[name]["pid"] == second[name]["pid"]  # untouched by the broker
        assert third["api"]["restarts"] == 0
        assert health["not ok"] == 0, health

        # SIGTERM: a clean stop in bounded time
        pids = [c["pid"] for c in kids().values()]
        t2 = time.monotonic()
        st["proc"].send_signal(signal.SIGTERM)
        assert st["proc"].wait(90) == 0
        timings["stop: SIGTERM -> exit 0"] = time.monotonic() - t2
        final = st["state"]()
        r.close()
    assert final["state"] == "stopped"
    assert not any(c["up"] for c in final["children"].values())
    assert not any(_alive(p) for p in pids)
    print("\n" + "\n".join(f"{k}: {v:.1f}s" for k, v in timings.items()))
    print("the event after the broker restart:", outcome)
    print("/healthz while killing:", health)
