"""How the release writer gets its bytes to disk while it goes on making the next ones: file
writing on threads of its own, each file on one lane in order (:class:`WriteQueue`; Parquet row
groups of exactly so many rows: :class:`pipeline.files.RowGroups`), and pieces of the release made in a child
process (:class:`Background`). Nothing here decides what a file holds: the bytes are those the
same rows written synchronously give.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

from pipeline.release.manifest import ReleaseError


class WriteQueue:
    """Threads ("lanes") that run the release's file writing (Parquet encoding and compression,
    which Arrow does without the GIL, and with the table files the making of their rows) while
    the caller goes on: publishing otherwise ran on one core.

    Work is submitted with a key, the file it writes: a key always runs on the same lane (keys
    are spread over the lanes in the order they first come), so each file's work runs in the order
    submitted and its bytes do not depend on the timing. At most ``limit`` tasks wait per lane
    (what they hold is the memory this costs); a failed task raises in the caller at its next
    submit, in :meth:`wait` or in :meth:`close`."""

    def __init__(self, limit: int = 2, lanes: int = 1) -> None:
        self.pools = [ThreadPoolExecutor(1, thread_name_prefix="dptab-write") for _ in range(max(lanes, 1))]
        self.queued: list[deque[Future[Any]]] = [deque() for _ in self.pools]
        self.lane: dict[int, int] = {}  # id(key) -> lane
        self.limit = limit

    def submit(self, key: object, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Run ``fn(*args)`` on ``key``'s lane, after the work submitted before it with that key."""
        k = self.lane.setdefault(id(key), len(self.lane) % len(self.pools))
        queued = self.queued[k]
        while queued and (queued[0].done() or len(queued) >= self.limit):
            queued.popleft().result()
        fut = self.pools[k].submit(fn, *args)
        queued.append(fut)
        return fut

    def wait(self) -> None:
        """Wait for everything submitted so far (raising the first failure)."""
        for queued in self.queued:
            while queued:
                queued.popleft().result()

    def close(self, cancel: bool = False) -> None:
        """Wait for the work and stop the threads; with ``cancel`` (the release failed) drop
        the waiting tasks and raise nothing, else raise a task's error."""
        for pool in self.pools:
            pool.shutdown(wait=True, cancel_futures=cancel)
        queued, self.queued = self.queued, [deque() for _ in self.pools]
        if not cancel:
            for q in queued:
                for fut in q:
                    fut.result()


def in_child(conn: Any, fn: Callable[..., Any], args: tuple[Any, ...], umask: int, nice: int = 0,
             alive: Any = None) -> None:
    """Child process of :class:`Background`: send ``("ok", fn(*args))`` or ``("error", text)``.
    ``umask``: the parent's — the fork server may have been started with another (a job starts
    its worker pool while writing its private run files), and the release's files must get the
    permissions the writer's own get; ``nice``: added to the child's niceness (lower priority);
    ``alive``: the reading end of a pipe whose writing end only the parent holds — the child ends
    as soon as the parent is gone (a child of the fork server outlives a parent killed with
    ``kill -9`` otherwise, writing on into a release folder a resumed run may already have
    removed)."""
    import os
    import traceback

    if alive is not None:
        def watch() -> None:
            try:
                alive.recv()  # nothing is ever sent: returns (EOFError) when the parent's end closes
            except (EOFError, OSError):
                pass
            os._exit(1)

        threading.Thread(target=watch, name="dptab-parent-watch", daemon=True).start()
    try:
        os.umask(umask)
        if nice:
            os.nice(nice)
        conn.send(("ok", fn(*args)))
    except BaseException as exc:  # the parent raises it; nothing may pass unreported
        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        conn.close()


class Background:
    """``fn(*args)`` (a module-level function, picklable arguments and result) for the release
    being written, started now and collected by :meth:`result`. ``mode``: ``"process"`` — in a
    child process (from the fork server, not a fork of this threaded process) while this one
    goes on, a failure there raised here as :class:`ReleaseError`; ``"thread"`` — on a thread
    of this process (no process to start and no data to reload, for releases too small to repay
    that; the work is Arrow, polars and hashing, which release the GIL); ``"inline"`` — here,
    when :meth:`result` is first asked for. Same result in every mode. ``nice``: the child
    process's added niceness (``"process"`` only: a thread shares this process's priority)."""

    MODES = ("process", "thread", "inline")

    def __init__(self, what: str, fn: Callable[..., Any], args: tuple[Any, ...], mode: str, nice: int = 0) -> None:
        import multiprocessing

        if mode not in self.MODES:
            raise ValueError(f"Background mode {mode!r}: one of {self.MODES}")
        self.what, self.fn, self.args = what, fn, args
        self._proc: Any = None
        self._alive: Any = None
        self._thread: threading.Thread | None = None
        self._outcome: tuple[bool, Any] | None = None
        if mode == "process":
            ctx = multiprocessing.get_context("forkserver")
            self._conn, child = ctx.Pipe(duplex=False)
            watched, self._alive = ctx.Pipe(duplex=False)  # this process holds the writing end alone
            umask = os.umask(0o077)
            os.umask(umask)
            self._proc = ctx.Process(target=in_child, args=(child, fn, args, umask, nice, watched),
                                     name=f"dptab-{what}", daemon=True)
            self._proc.start()
            child.close()
            watched.close()
        elif mode == "thread":
            self._thread = threading.Thread(target=self._run, name=f"dptab-{what}", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            self._outcome = (True, self.fn(*self.args))
        except BaseException as exc:  # re-raised by result() in the caller's thread
            self._outcome = (False, exc)

    def result(self) -> Any:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            assert self._outcome is not None
            ok, value = self._outcome
            if not ok:
                raise value
            return value
        if self._proc is None:
            return self.fn(*self.args)
        try:
            status, value = self._conn.recv()
        except EOFError:
            self._proc.join()
            raise ReleaseError(f"the {self.what} process ended without a result (exit code "
                               f"{self._proc.exitcode})") from None
        finally:
            self._conn.close()
            self._alive.close()  # the child has sent its result, or is gone
        self._proc.join()
        self._proc = None
        if status != "ok":
            raise ReleaseError(f"the {self.what} process failed: {value}")
        return value

    def cancel(self) -> None:
        """Stop a child still running, or wait for a thread (which cannot be stopped): the
        folder is about to be removed, never under a writer still in it."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._proc is not None:
            self._proc.terminate()
            self._proc.join()
            self._conn.close()
            self._alive.close()
            self._proc = None


