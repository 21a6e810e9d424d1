"""Worker processes that each own one object (a slice of environments) and run its methods on request.

`ProcessPool` forks one process per factory; the process builds its object, replies with ``object.info()`` and
then serves calls. A call sends every worker one message (an 8-byte header naming the method, then the payload
bytes) and reads one reply each (an 8-byte status, then the method's result bytes, or a traceback). The parent
sleeps in ``select`` on each worker's pipe *and* its process sentinel with a timeout, so a worker that raises,
is killed or hangs becomes a `WorkerError` naming the pool and the worker, never a hang or a busy-wait (the
busy-waiting of TorchRL's ``ParallelEnv`` is what DESIGN §9 measured as slow on 2 cores).

Shutdown: `close()` (idempotent) asks the workers to exit and kills those that do not; a `weakref.finalize` does
the same when the pool is collected or the interpreter exits (an exception or Ctrl-C in the parent); workers are
daemonic, ignore SIGINT (Ctrl-C is the parent's to handle), and exit on their own when the parent's end of their
pipe closes (the parent was killed): each worker closes its inherited copies of every pool's parent ends, so the
parent is the only holder.

Workers are forked: they start in milliseconds with the parent's imports. ``forkserver``/``spawn`` re-run the
parent's ``__main__`` module in every worker on Python 3.11 (its forkserver never preloads ``__main__``), which
cost seconds per worker (torch import) and breaks unguarded scripts. A forked worker runs only numpy and the
simulator (never torch ops, CUDA or rendering), which is what makes forking a threaded parent safe here.

`LocalPool` has the same interface and runs the objects in the calling process (no pipes, no copies).
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection as mpc
import pickle
import signal
import sys
import traceback
import weakref
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

_OK = b"ok".ljust(8, b"\0")
_ERROR = b"error".ljust(8, b"\0")
_HEADER = 8
_CLOSE = 255  # method index that asks a worker to exit


# Parent ends of every live pool's pipes. A forked worker closes its copies, so the parent's death (or close)
# reads as EOF in every worker.
_PARENT_ENDS: weakref.WeakSet[mpc.Connection] = weakref.WeakSet()


class WorkerError(RuntimeError):
    """A worker raised, died or stopped answering; the pool is closed when this is raised."""


def _worker_main(conn: mpc.Connection, factory: Callable[[], Any], methods: tuple[str, ...]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the parent, which then closes us
    for end in list(_PARENT_ENDS):
        end.close()
    if "torch" in sys.modules:  # forked from a torch process: the workers are the parallelism
        sys.modules["torch"].set_num_threads(1)
    try:
        try:
            obj = factory()
            conn.send_bytes(_OK + pickle.dumps(obj.info()))
        except Exception:
            conn.send_bytes(_ERROR + traceback.format_exc().encode())
            return
        bound = [getattr(obj, name) for name in methods]
        while True:
            msg = conn.recv_bytes()  # EOFError when the parent is gone
            code = msg[0]
            if code == _CLOSE:
                return
            try:
                result = bound[code](memoryview(msg)[_HEADER:])
            except Exception:
                conn.send_bytes(_ERROR + traceback.format_exc().encode())
                return
            conn.send_bytes(_OK + bytes(result))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return  # the parent died or closed the pipe: nothing left to serve


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "is still running"
    if exitcode < 0:
        try:
            return f"died from signal {signal.Signals(-exitcode).name} (exit code {exitcode})"
        except ValueError:
            return f"died from signal {-exitcode} (exit code {exitcode})"
    return f"exited with code {exitcode}"


def _shutdown(procs: list[Any], conns: list[mpc.Connection]) -> None:
    """Ask every worker to exit, wait briefly, kill the rest. Safe to call twice and on dead workers."""
    for conn in conns:
        try:
            conn.send_bytes(bytes([_CLOSE]).ljust(_HEADER, b"\0"))
        except (OSError, ValueError):
            pass  # already dead or closed
    for proc in procs:
        proc.join(timeout=1.0)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=1.0)
    for conn in conns:
        conn.close()


class ProcessPool:
    """One worker process per factory; ``call(method, payloads)`` runs ``obj.method(payload)`` in each, in parallel.

    `methods` names the callable methods (at most 255); `name` prefixes every error message (e.g. the task
    name); `timeout_s` bounds how long the parent waits for any one reply.
    """

    def __init__(
        self,
        factories: Sequence[Callable[[], Any]],
        *,
        methods: Sequence[str],
        name: str,
        timeout_s: float = 120.0,
    ) -> None:
        if not factories:
            raise ValueError("ProcessPool needs at least one factory, got none")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.name = name
        self.timeout_s = timeout_s
        self._codes = {m: i for i, m in enumerate(methods)}
        if len(self._codes) >= _CLOSE:
            raise ValueError(f"at most {_CLOSE - 1} methods, got {len(self._codes)}")
        ctx = mp.get_context("fork")
        self._procs: list[Any] = []
        self._conns: list[mpc.Connection] = []
        self._closed = False
        self._finalizer = weakref.finalize(self, _shutdown, self._procs, self._conns)
        try:
            for k, factory in enumerate(factories):
                parent_end, child_end = ctx.Pipe(duplex=True)
                _PARENT_ENDS.add(parent_end)
                proc = ctx.Process(
                    target=_worker_main,
                    args=(child_end, factory, tuple(methods)),
                    name=f"{name}-worker{k}",
                    daemon=True,
                )
                try:
                    proc.start()
                except BaseException:
                    parent_end.close()
                    raise
                finally:
                    child_end.close()  # only the worker holds its end, so its death reads as EOF here
                self._procs.append(proc)
                self._conns.append(parent_end)
            self.infos = [pickle.loads(self._receive(k)) for k in range(len(factories))]
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self._procs]

    def _receive(self, k: int) -> memoryview:
        conn, proc = self._conns[k], self._procs[k]
        ready = mpc.wait([conn, proc.sentinel], timeout=self.timeout_s)
        if not ready:
            raise WorkerError(f"{self.name}: worker {k} (pid {proc.pid}) sent no reply within {self.timeout_s} s")
        if conn in ready:
            try:
                msg = conn.recv_bytes()
            except (EOFError, OSError):
                msg = None  # it died without a reply: report its exit code below
            if msg is not None:
                if msg[:_HEADER] == _OK:
                    return memoryview(msg)[_HEADER:]
                error = msg[_HEADER:].decode(errors="replace").rstrip()
                raise WorkerError(f"{self.name}: worker {k} (pid {proc.pid}) raised:\n{error}")
        self._raise_dead(k)

    def _raise_dead(self, k: int) -> NoReturn:
        proc = self._procs[k]
        proc.join(timeout=2.0)
        raise WorkerError(f"{self.name}: worker {k} (pid {proc.pid}) {_describe_exit(proc.exitcode)}")

    def call(self, method: str, payloads: Sequence[Any]) -> list[memoryview]:
        """Run ``method(payloads[k])`` in worker k for every k; returns the replies in worker order."""
        if self._closed:
            raise WorkerError(f"{self.name}: the pool is closed")
        header = bytes([self._codes[method]]).ljust(_HEADER, b"\0")
        try:
            for k, (conn, payload) in enumerate(zip(self._conns, payloads, strict=True)):
                try:
                    conn.send_bytes(header + bytes(payload))
                except BrokenPipeError:
                    self._raise_dead(k)  # gone before it could read: report how it ended
            return [self._receive(k) for k in range(len(self._conns))]
        except BaseException:
            # Replies may be pending (Ctrl-C mid-call) or a worker is dead: the pool cannot be used again.
            self.close()
            raise

    def close(self) -> None:
        self._closed = True
        self._finalizer()


class LocalPool:
    """`ProcessPool`'s interface, running the objects in this process (for one env, or ``num_workers=0``)."""

    def __init__(self, factories: Sequence[Callable[[], Any]], *, methods: Sequence[str], name: str) -> None:
        self.name = name
        self._methods = frozenset(methods)
        self._objs = [factory() for factory in factories]
        self.infos = [obj.info() for obj in self._objs]
        self.pids: list[int] = []

    def call(self, method: str, payloads: Sequence[Any]) -> list[Any]:
        if not self._objs:
            raise WorkerError(f"{self.name}: the pool is closed")
        if method not in self._methods:
            raise KeyError(method)
        return [getattr(obj, method)(payload) for obj, payload in zip(self._objs, payloads, strict=True)]

    def close(self) -> None:
        self._objs = []
