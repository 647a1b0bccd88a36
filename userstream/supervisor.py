"""Process supervision: start children, restart the ones that die, stop them all.

:class:`Supervisor` runs a list of :class:`Child` processes (made by
:func:`command_child` for a command line, or any start function) and knows
nothing about userstream's processes; :mod:`userstream.stack` says which
children ``userstream up`` runs and how they depend on each other.

once started, a child that exits for any
reason (an error, a signal, even exit code 0) is logged with its exit code or
signal, its restart count and the tail of its log, and started again after a
backoff of ``BACKOFF_INITIAL_S`` doubling with each consecutive failure up to
``BACKOFF_MAX_S``; a child that had run ``HEALTHY_AFTER_S`` when it died starts
over from the initial delay. Two rules order the restarts:

* a child is not started while a child it *needs* is down (every service needs
  the bundled Redis when the stack started one);
* a child that *follows* another (the stream worker and the demo producer follow
  the embedded broker) is stopped when that one exits (SIGTERM, SIGKILL after
  ``FOLLOWER_GRACE_S`` at most), and the other is started again only once its
  followers are down. The embedded broker keeps its topics in memory, so a new
  broker is a new, empty log: it gets its topics again
  (``stream.topics.ensure_topics``) before its followers start, and they start
  against it from scratch. A stop the supervisor asked for is not a failure: it
  adds no backoff.

Stop: on SIGTERM or SIGINT nothing is restarted any more and the children are
stopped in reverse start order: SIGTERM, then SIGKILL (to the child's process
group) once its grace has passed (``GRACE_S``; ``TRAIN_GRACE_S`` for the
training worker, which first finishes its current training step), and at once
for everything left when ``STOP_TIMEOUT_S`` has passed since the stop began. A
second signal during the stop kills what is left at once. :func:`run_stack`
then returns 0.

``<data_dir>/supervisor.json`` holds what the supervisor knows, rewritten on
every change (a temp file, then ``os.replace``: a reader never sees half a
file). The children are ``broker`` and ``redis`` (when the stack started them),
``stream-worker``, ``train-worker``, ``api`` and ``demo-producer`` (with
``--demo``); a child that is stopping is still ``up``::

    {
      "pid": 4242,                 # the supervisor (`userstream up`)
      "state": "running",          # starting | running | stopping | stopped
      "updated_at": 1718000000.5,  # Unix time of this write
      "children": {                # by name, in start order
        "train-worker": {
          "pid": 4251,             # the running process; null while none runs
          "up": true,              # a process of this child is running
          "state": "running",      # running | stopping | waiting (to be started) | stopped
          "restarts": 1,           # starts after the first one
          "started_at": 1718000000.2,       # Unix time the current (or last) process started
          "last_restart_at": 1718000000.2,  # null until the first restart
          "next_restart_at": null, # while waiting: the earliest time of the next start
          "last_exit": {           # null until a process of this child ended
            "pid": 4250,
            "code": null,          # exit code; null when a signal ended it
            "signal": "SIGKILL",   # or null
            "at": 1718000000.1,    # Unix time it was seen to end
            "uptime_s": 812.4,
            "error": null          # why a start failed (then pid, code and signal are null)
          }
        }
      }
    }
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Child",
    "Supervisor",
    "command_child",
    "describe_exit",
    "kill_group",
    "log_tail",
    "port_free",
]

LOG = logging.getLogger(__name__)

BACKOFF_INITIAL_S = 1.0
BACKOFF_MAX_S = 30.0
HEALTHY_AFTER_S = 60.0
GRACE_S = 20.0
TRAIN_GRACE_S = 60.0
FOLLOWER_GRACE_S = 5.0
STOP_TIMEOUT_S = 90.0
API_START_TIMEOUT_S = 120.0
REPORT_EVERY_S = 10.0
_POLL_S = 0.2

RUNNING, STOPPING, WAITING, STOPPED = "running", "stopping", "waiting", "stopped"


@dataclass(eq=False)
class Child:
    """One supervised process: how to start it, and what the supervisor knows of it."""

    name: str
    launch: Callable[[], subprocess.Popen]  # returns once the process is up; raises if not
    log_path: Path
    grace_s: float = GRACE_S
    needs: tuple[str, ...] = ()
    follows: str | None = None
    after_exit: Callable[[int], None] | None = None  # called with the pid that ended
    proc: subprocess.Popen | None = None
    state: str = WAITING
    restarts: int = 0
    failures: int = 0  # consecutive; sets the backoff
    started_at: float | None = None
    last_restart_at: float | None = None
    last_exit: dict[str, Any] | None = None
    restart_at: float = 0.0  # monotonic
    kill_at: float = 0.0  # monotonic, while stopping
    stop_reason: str | None = None  # set when the supervisor asked it to stop
    started_mono: float = 0.0

    @property
    def up(self) -> bool:
        return self.proc is not None

    def snapshot(self) -> dict[str, Any]:
        waiting = self.state == WAITING and self.started_at is not None
        return {
            "pid": self.proc.pid if self.proc is not None else None,
            "up": self.up,
            "state": self.state,
            "restarts": self.restarts,
            "started_at": self.started_at,
            "last_restart_at": self.last_restart_at,
            "next_restart_at": (
                time.time() + max(0.0, self.restart_at - time.monotonic()) if waiting else None
            ),
            "last_exit": self.last_exit,
        }


def command_child(
    name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None, **options: Any
) -> Child:
    """A child that runs ``argv`` in a session of its own, logging to ``log_path``."""

    def launch() -> subprocess.Popen:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:  # the child keeps its own descriptor
            return subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    return Child(name, launch, log_path, **options)


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text[-lines:])


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def describe_exit(code: int) -> str:
    return f"ended by {_signal_name(-code)}" if code < 0 else f"exited with code {code}"


def _exit_record(
    pid: int | None, code: int | None, uptime_s: float, error: str | None = None
) -> dict[str, Any]:
    return {
        "pid": pid,
        "code": code if code is not None and code >= 0 else None,
        "signal": _signal_name(-code) if code is not None and code < 0 else None,
        "at": time.time(),
        "uptime_s": round(uptime_s, 1),
        "error": error,
    }


def _terminate(proc: subprocess.Popen) -> None:
    try:
        proc.send_signal(signal.SIGTERM)
    except ProcessLookupError:
        pass


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child and what it started: its process group, when it leads one."""
    try:
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, signal.SIGKILL)
            return
    except ProcessLookupError:
        return
    except OSError:
        pass
    proc.kill()


class Supervisor:
    """Starts children, starts again those that die, and stops them all in bounded time.

    :meth:`serve` is the whole life: signal handlers, start, :meth:`run` until a
    signal, :meth:`stop`. State goes to ``state_path`` (see the module docstring).
    """

    def __init__(
        self,
        state_path: Path | None = None,
        *,
        backoff_initial_s: float = BACKOFF_INITIAL_S,
        backoff_max_s: float = BACKOFF_MAX_S,
        healthy_after_s: float = HEALTHY_AFTER_S,
        stop_timeout_s: float = STOP_TIMEOUT_S,
    ) -> None:
        self.state_path = state_path
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.healthy_after_s = healthy_after_s
        self.stop_timeout_s = stop_timeout_s
        self.children: list[Child] = []
        self.state = "starting"
        self.signals = 0  # SIGTERM/SIGINT received; a second one forces the stop

    # --- the whole life ------------------------------------------------------
    def serve(self, start: Callable[[], None], on_tick: Callable[[], None] | None = None) -> int:
        """Run ``start`` (which launches the children), supervise until SIGTERM or
        SIGINT, stop. 0 after that stop; 1 when ``start`` raised (logged)."""
        previous = {
            s: signal.signal(s, self.handle_signal) for s in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            try:
                start()
            except Exception as exc:
                LOG.error("could not start: %s", exc)
                self.stop()
                return 1
            except BaseException:
                self.stop()
                raise
            self.run(on_tick)
            self.stop()
            return 0
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def handle_signal(self, signum: int, _frame: object = None) -> None:
        self.signals += 1
        if self.signals == 1:
            LOG.info("%s: stopping", _signal_name(signum))
        else:
            LOG.warning("%s again: killing what is left", _signal_name(signum))

    # --- start -----------------------------------------------------------------
    def launch(self, child: Child) -> Child:
        """Start ``child`` for the first time; raises when it cannot start."""
        child.proc = child.launch()
        self._started(child)
        return child

    def adopt(self, child: Child, proc: subprocess.Popen) -> Child:
        """Supervise ``child`` whose first process, ``proc``, was started elsewhere."""
        child.proc = proc
        self._started(child)
        return child

    def _started(self, child: Child) -> None:
        if child not in self.children:
            self.children.append(child)
        child.state, child.stop_reason = RUNNING, None
        child.started_at, child.started_mono = time.time(), time.monotonic()
        LOG.info(
            "started %-14s pid %-7d log %s%s",
            child.name,
            child.proc.pid,
            child.log_path,
            f" (restart {child.restarts})" if child.restarts else "",
        )
        self._write_state()

    # --- supervise -------------------------------------------------------------
    def run(self, on_tick: Callable[[], None] | None = None) -> None:
        """:meth:`watch` until a signal, calling ``on_tick`` every ``REPORT_EVERY_S``."""
        self.state = "running"
        self._write_state()
        last_tick = time.monotonic()
        while not self.signals:
            self.watch()
            if on_tick is not None and time.monotonic() - last_tick >= REPORT_EVERY_S:
                last_tick = time.monotonic()
                on_tick()
            time.sleep(_POLL_S)

    def watch(self) -> None:
        """One pass: note the children that ended, kill those past their grace,
        start those that are due (in start order, so a broker before its followers)."""
        for child in self.children:
            if child.proc is not None and child.proc.poll() is not None:
                self._exited(child)
            elif child.state == STOPPING and time.monotonic() >= child.kill_at:
                LOG.warning("%s did not stop in time; killing it", child.name)
                kill_group(child.proc)
                child.kill_at = float("inf")
        for child in self.children:
            if self.signals:
                return
            if (
                child.state == WAITING
                and time.monotonic() >= child.restart_at
                and self._may_start(child)
            ):
                self._restart(child)

    def _may_start(self, child: Child) -> bool:
        by_name = {c.name: c for c in self.children}
        needed = (*child.needs, child.follows) if child.follows else child.needs
        if any(by_name[n].state != RUNNING for n in needed if n in by_name):
            return False
        return not any(c.up for c in self.children if c.follows == child.name)

    def _backoff(self, child: Child, uptime_s: float) -> float:
        if uptime_s >= self.healthy_after_s:
            child.failures = 0
        delay = min(self.backoff_max_s, self.backoff_initial_s * 2 ** min(child.failures, 30))
        child.failures += 1
        return delay

    def _exited(self, child: Child) -> None:
        proc, code = child.proc, child.proc.returncode
        uptime = time.monotonic() - child.started_mono
        child.proc = None
        child.last_exit = _exit_record(proc.pid, code, uptime)
        if child.stop_reason is not None:
            delay = 0.0
            LOG.info(
                "%s (pid %d) %s: %s", child.name, proc.pid, describe_exit(code), child.stop_reason
            )
        else:
            delay = self._backoff(child, uptime)
            LOG.error(
                "%s (pid %d) %s after %.1fs; restart %d in %.1fs; last lines of %s:\n%s",
                child.name,
                proc.pid,
                describe_exit(code),
                uptime,
                child.restarts + 1,
                delay,
                child.log_path,
                log_tail(child.log_path),
            )
        child.state, child.stop_reason = WAITING, None
        child.restart_at = time.monotonic() + delay
        for follower in self.children:
            if follower.follows == child.name and follower.state == RUNNING:
                self._ask_stop(follower, f"stopped because {child.name} ended")
        if child.after_exit is not None:
            try:
                child.after_exit(proc.pid)
            except Exception as exc:  # clean-up is best effort; supervision goes on
                LOG.warning("clean-up after %s failed: %r", child.name, exc)
        self._write_state()

    def _ask_stop(self, child: Child, reason: str) -> None:
        LOG.info("stopping %s (pid %d): %s", child.name, child.proc.pid, reason)
        child.state, child.stop_reason = STOPPING, reason
        # what it follows is gone, so it cannot finish cleanly (a Faust worker keeps
        # retrying its offset commit): long enough to put an in-flight batch in Redis
        child.kill_at = time.monotonic() + min(child.grace_s, FOLLOWER_GRACE_S)
        _terminate(child.proc)
        self._write_state()

    def _restart(self, child: Child) -> None:
        n = child.restarts + 1
        try:
            with open(child.log_path, "ab") as log:  # where this run starts in a shared log
                log.write(f"--- userstream up: restart {n} of {child.name} ---\n".encode())
        except OSError:
            pass
        try:
            proc = child.launch()
        except Exception as exc:
            delay = self._backoff(child, 0.0)
            child.last_exit = _exit_record(None, None, 0.0, error=str(exc))
            child.restart_at = time.monotonic() + delay
            LOG.error(
                "%s could not be started again (%s); next try in %.1fs", child.name, exc, delay
            )
            self._write_state()
            return
        child.proc, child.restarts, child.last_restart_at = proc, n, time.time()
        self._started(child)

    # --- stop --------------------------------------------------------------------
    def stop(self) -> None:
        """Stop every child in reverse start order, each within its grace and all
        within ``stop_timeout_s``; a second signal kills what is left at once."""
        t0 = time.monotonic()
        deadline = t0 + self.stop_timeout_s
        self.state = "stopping"
        self._write_state()
        for child in reversed(self.children):
            self._stop_child(child, deadline)
        self.state = "stopped"
        self._write_state()
        LOG.info("stopped in %.1fs", time.monotonic() - t0)

    def _stop_child(self, child: Child, deadline: float) -> None:
        proc = child.proc
        if proc is None:
            child.state = STOPPED
            return
        if proc.poll() is None and self.signals < 2 and time.monotonic() < deadline:
            if child.state != STOPPING:
                child.state, child.kill_at = STOPPING, time.monotonic() + child.grace_s
                _terminate(proc)
                self._write_state()
            end = min(child.kill_at, deadline)
            while proc.poll() is None and time.monotonic() < end and self.signals < 2:
                time.sleep(0.05)
        if proc.poll() is None:
            if self.signals >= 2:
                why = "a second signal"
            elif time.monotonic() >= deadline:
                why = f"the stop took more than {self.stop_timeout_s:.0f}s"
            else:
                why = "it did not stop within its grace"
            LOG.warning("killing %s (pid %d): %s", child.name, proc.pid, why)
            kill_group(proc)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                LOG.error("%s (pid %d) outlived SIGKILL", child.name, proc.pid)
                return
        code = proc.returncode
        child.last_exit = _exit_record(proc.pid, code, time.monotonic() - child.started_mono)
        child.proc, child.state = None, STOPPED
        LOG.info("%s stopped (%s)", child.name, describe_exit(code))
        self._write_state()

    # --- state file ----------------------------------------------------------------
    def _write_state(self) -> None:
        if self.state_path is None:
            return
        doc = {
            "pid": os.getpid(),
            "state": self.state,
            "updated_at": time.time(),
            "children": {c.name: c.snapshot() for c in self.children},
        }
        tmp = self.state_path.with_name(f".{self.state_path.name}.{os.getpid()}.tmp")
        try:
            self.state_path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(doc, indent=1))
            os.replace(tmp, self.state_path)
        except OSError as exc:  # the file informs; it must never stop supervision
            LOG.warning("could not write %s: %r", self.state_path, exc)
