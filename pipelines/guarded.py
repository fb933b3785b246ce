"""A watchdog child process that runs one video at a time for a Ray worker, with a time limit and a crash budget.

Why: a native decoder abort, a segfault or an OOM kill takes its whole process down. Inside a Ray Data task or
actor that means Ray retries the block, by default for ever, and an actor pool whose actor is dead for good
stalls the stream. A hang (a stuck decoder, a device file) has no time limit at all in Ray. So the work that
touches one video's bytes runs in a child process owned by the worker: the child lives across videos (the face
models load once per child, not once per video), the worker waits for each call at most ``timeout_s``, and when
the child dies the worker starts a fresh one and tries the same video again, at most ``retries`` times. A video
that still kills its child is a :class:`Crashed` outcome, one that runs out of time a :class:`TimedOut` one; the
worker itself stays alive, so Ray never sees the failure and the job goes on.

The child is ``python -m pipelines.guarded FD`` on one end of a socket pair (no ``multiprocessing`` spawn, which
would re-import the Ray worker's main module). It exits when its parent goes away, so a killed worker or a lost
node leaves no orphan behind. Written by hand: neither Ray nor the standard library offers a per-call time limit
and a restart budget around a stateful process.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Callable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Crashed:
    """The call took its process down ``attempts`` times (exit code or signal of the last one)."""

    attempts: int
    exit_code: int | None


@dataclass(frozen=True)
class TimedOut:
    seconds: float


class GuardError(RuntimeError):
    """The child could not be started, or its setup raised: a setup problem, not a property of one video."""


def _dumps(obj: Any) -> bytes:
    # cloudpickle carries functions and classes defined in tests or notebooks by value; Ray's copy honours
    # register_pickle_by_value, so prefer it when Ray is there.
    try:
        from ray import cloudpickle
    except ImportError:  # pragma: no cover - the guard itself does not need Ray
        import cloudpickle
    return cloudpickle.dumps(obj, protocol=5)


class GuardedWorker:
    """Runs ``fn(state, *args)`` in a child whose ``state = setup()`` is built once per child."""

    def __init__(self, setup: Callable[[], Any] | None, *, timeout_s: float, retries: int,
                 setup_timeout_s: float = 600.0, name: str = "guarded") -> None:
        self._setup = _dumps(setup)
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.setup_timeout_s = float(setup_timeout_s)
        self.name = name
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self.restarts = 0

    # -- child lifecycle

    def _start(self) -> None:
        parent_sock, child_sock = socket.socketpair()
        env = dict(os.environ)
        # The child sees the same modules as this worker (Ray's working_dir and py_modules live on sys.path).
        env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")])
        try:
            self._proc = subprocess.Popen([sys.executable, "-m", "pipelines.guarded", str(child_sock.fileno())],
                                          pass_fds=(child_sock.fileno(),), env=env, stdin=subprocess.DEVNULL)
        finally:
            child_sock.close()
        self._conn = Connection(parent_sock.detach())
        self._conn.send_bytes(self._setup)
        if not self._conn.poll(self.setup_timeout_s):
            self.close()
            raise GuardError(f"{self.name}: child setup took over {self.setup_timeout_s:.0f} s")
        try:
            kind, payload = pickle.loads(self._conn.recv_bytes())
        except (EOFError, OSError) as exc:
            code = self._reap()
            raise GuardError(f"{self.name}: child died during setup (exit {code})") from exc
        if kind != "ready":
            self.close()
            raise GuardError(f"{self.name}: child setup failed: {payload}")

    def _reap(self) -> int | None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        code = None
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            try:
                code = self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL not honoured (D state)
                code = None
            self._proc = None
        return code

    def close(self) -> None:
        self._reap()

    def __del__(self) -> None:  # best effort: the child also exits on its own when this process goes
        try:
            self._reap()
        except Exception:  # noqa: BLE001
            pass

    # -- calls

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(state, *args)`` in the child: its result, or :class:`Crashed` / :class:`TimedOut`.
        An exception raised by ``fn`` is raised here again (as ``RuntimeError`` with its text)."""
        request = _dumps((fn, args))
        attempts = 0
        while True:
            attempts += 1
            if self._proc is None or self._proc.poll() is not None:
                if self._proc is not None:
                    self._reap()
                    self.restarts += 1
                self._start()
            assert self._conn is not None
            t0 = time.monotonic()
            try:
                self._conn.send_bytes(request)
                ready = self._conn.poll(self.timeout_s)
            except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
                ready = True  # the child is gone: recv below says so
            if not ready:
                self._reap()
                return TimedOut(round(time.monotonic() - t0, 1))
            try:
                kind, payload = pickle.loads(self._conn.recv_bytes())
            except (EOFError, OSError, ConnectionResetError):
                code = self._reap()
                log.warning("%s: child died (exit %s) on attempt %d", self.name, code, attempts)
                if attempts > self.retries:
                    return Crashed(attempts, code)
                continue
            if kind == "ok":
                return payload
            raise RuntimeError(payload)


# ---------------------------------------------------------------- the child


def _watch_parent(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            os._exit(0)  # the worker is gone (killed, node lost): nobody wants the result
        time.sleep(1.0)


def _child_main(fd: int) -> None:
    import resource

    # A crash here is expected and handled: no core file (a multi-GB dump per crashing video would cost
    # minutes and fill the disk).
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    conn = Connection(fd)
    try:
        setup = pickle.loads(conn.recv_bytes())
        state = setup() if setup is not None else None
    except EOFError:
        return
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises GuardError
        conn.send_bytes(pickle.dumps(("error", f"{type(exc).__name__}: {exc}")))
        return
    conn.send_bytes(pickle.dumps(("ready", None)))
    while True:
        try:
            fn, args = pickle.loads(conn.recv_bytes())
        except EOFError:
            return
        try:
            out = ("ok", fn(state, *args))
        except Exception as exc:  # noqa: BLE001 - raised again in the parent
            out = ("error", f"{type(exc).__name__}: {exc}"[:1000])
        try:
            data = pickle.dumps(out, protocol=5)
        except Exception as exc:  # noqa: BLE001 - an unpicklable result is the call's error, not a crash
            data = pickle.dumps(("error", f"result cannot be sent: {type(exc).__name__}: {exc}"[:1000]))
        conn.send_bytes(data)


if __name__ == "__main__":
    _child_main(int(sys.argv[1]))
