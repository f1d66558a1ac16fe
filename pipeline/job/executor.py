"""The one executor of a run: where independent pieces of work run.

Locally (``execution.executor: local``): this process (``workers: 1``) or one pool of worker
processes kept for the whole run (``workers > 1``), created on first use and reused by every
shard of every level — not one pool per shard. The post-processing engine never starts
processes itself: it receives :meth:`Executor.map` and splits a level's parents into ``chunks``
independent work items.

On a Dask cluster (``execution.executor: dask``, ``execution.dask_address``): the shards of a
level are the work items, one Dask task each (:class:`DaskExecutor`); every task reads and
writes its own shard files in the run directory (which the workers must see at the same
path) and solves its parents on its task's thread (never a pool: the cluster's threads are the
run's cores) — or, when the level has fewer shards than the cluster has threads, as tasks of
their own on the cluster (:class:`ClusterTasks`). Results are the same as a local run: noise is
keyed by (run kind, level, shard) and every parent's solve is deterministic.

Workers come from a fork server, not a fork of this process: this process may run threads (a
Prefect task runner, its API client, a logging handler), and forking a threaded process can
deadlock the child on a lock held at fork time (PrefectHQ/prefect#19112). Each worker pins BLAS
to one thread, so two workers use two cores.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from multiprocessing.connection import Connection
from typing import TypeVar

from pipeline.runtime import WORKER_KEEP_FREE_BYTES, allocator_defaults, return_free_memory, use_heap_for_large_arrays

T = TypeVar("T")
R = TypeVar("R")

#: BLAS / OpenMP thread counts of each worker process (one core each)
_WORKER_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
#: work items per worker for a level's parents (evens out unequal parents)
CHUNKS_PER_WORKER = 4


class Executor:
    """Runs ``fn`` over independent items, in order of the results; see the module doc."""

    def __init__(self, workers: int = 1) -> None:
        self.workers = max(1, int(workers))
        self._pool: ProcessPoolExecutor | None = None
        self._alive: tuple[Connection, Connection] | None = None
        self._lock = threading.Lock()  # shards on several threads share the pool: start it once
        self._step = 0  # the run's step (level) the items belong to, :meth:`next_step`

    @property
    def parallel(self) -> bool:
        # a daemonic process (a Dask worker under its nanny) may not start children: run here
        return self.workers > 1 and not multiprocessing.current_process().daemon

    @property
    def chunks(self) -> int:
        """How many work items to cut a level's parents into."""
        return self.workers * CHUNKS_PER_WORKER if self.parallel else 1

    def map(self, fn: Callable[[T], R], items: Sequence[T],
            on_done: Callable[[int, int], None] | None = None) -> list[R]:
        """``[fn(x) for x in items]``, in a worker pool when parallel and worth it. ``fn`` must
        be a module-level function and the items picklable. ``on_done(done, total)`` is called
        as items finish (for progress display)."""
        total = len(items)
        if not self.parallel or total < 2:
            out = []
            for x in items:
                out.append(fn(x))
                if on_done is not None:
                    on_done(len(out), total)
            return out
        if on_done is None:
            return list(self.imap(fn, items))
        futures = [self._get_pool().submit(_then_free, fn, self._step, x) for x in items]
        for k, _ in enumerate(as_completed(futures), start=1):
            on_done(k, total)
        return [f.result() for f in futures]

    def imap(self, fn: Callable[[T], R], items: Sequence[T]) -> Iterator[R]:
        """``fn(x)`` for each item, yielded in order as soon as it (and every item before it) is
        done, so the caller works on the first results while the pool computes the rest."""
        if not self.parallel or len(items) < 2:
            return (fn(x) for x in items)
        return self._get_pool().map(functools.partial(_then_free, fn, self._step), items)

    def submit(self, fn: Callable[[T], R], item: T) -> "Future[R]":
        """``fn(item)`` in the worker pool, as a future (callers check :attr:`parallel` first)."""
        return self._get_pool().submit(_then_free, fn, self._step, item)

    def next_step(self) -> None:
        """The items submitted from now on belong to the run's next step (level): each worker
        gives back everything it kept free before its first item of it, so what a worker holds
        is what the step's own items left, not the largest item of the run so far (measured at
        100 M persons: a worker held 614 MB from the tract level's largest county through the
        block levels)."""
        self._step += 1

    def _get_pool(self) -> ProcessPoolExecutor:
        with self._lock:
            return self._start_pool()

    def _start_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["pipeline.postprocess.topdown"])
            env = {**{k: v for k, v in allocator_defaults().items() if k not in os.environ}, **_WORKER_ENV}
            old = {k: os.environ.get(k) for k in env}
            os.environ.update(env)  # inherited by the fork server and its workers
            # each worker holds the reading end of a pipe whose one writing end stays here: it
            # sees the end of the pipe when this process is gone, however it ended (see
            # _exit_with_driver)
            self._alive = ctx.Pipe(duplex=False)
            try:
                self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx,
                                                 initializer=_exit_with_driver, initargs=(self._alive[0],))
                # start the fork server and workers now, while the environment is pinned
                list(self._pool.map(int, range(self.workers)))
            finally:
                for k, v in old.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._alive is not None:
            for end in self._alive:
                end.close()
            self._alive = None


#: in a worker: the step of the last item it ran (:meth:`Executor.next_step`)
_WORKER_STEP: list[int] = []


def _then_free(fn: Callable[[T], R], step: int, item: T) -> R:
    """``fn(item)`` in a worker, then its freed memory back to the system if it is more than
    the next task is likely to reuse (``runtime.use_heap_for_large_arrays``); the first item of
    a new ``step`` first gives back all of it (the last step's items are not the next ones)."""
    if _WORKER_STEP and _WORKER_STEP[0] != step:
        return_free_memory()
    _WORKER_STEP[:] = [step]
    try:
        return fn(item)
    finally:
        return_free_memory(keep=WORKER_KEEP_FREE_BYTES)


def _exit_with_driver(alive: Connection) -> None:
    """Pool initializer: end this worker as soon as the process that started the pool is gone.

    A worker waits for work on a queue whose writing end it holds itself, and the fork server
    that started it stays up while any of its children does: when the driver was killed
    (``kill -9``, the out-of-memory killer) the fork server, its workers and the resource
    tracker stayed, idle and holding their memory, until the machine restarted (measured: a
    killed 10 M-person run's two workers, 10 minutes later). ``alive`` is the reading end of a
    pipe whose writing end only the driver holds; nothing is ever sent on it."""

    def watch() -> None:
        try:
            alive.recv()
        except (EOFError, OSError):
            pass
        os._exit(1)

    threading.Thread(target=watch, name="dptab-driver-watch", daemon=True).start()
    use_heap_for_large_arrays()  # the worker's large arrays from its heap (see there)


_current: Executor | None = None
_CURRENT_LOCK = threading.Lock()  # shards on threads ask for it at once


def executor_for(workers: int) -> Executor:
    """This process's executor for ``workers`` (kept across shards and levels of a run; shards
    running on threads get the same one)."""
    global _current
    with _CURRENT_LOCK:
        if _current is None or _current.workers != max(1, int(workers)):
            close_executor()
            _current = Executor(workers)
        return _current


def close_executor() -> None:
    """Stop this process's worker pool (end of a run)."""
    global _current
    if _current is not None:
        _current.close()
        _current = None


class ClusterTasks:
    """From inside a shard's task on a Dask cluster: the shard's work items as tasks on the same
    cluster, so a level with fewer shards than the cluster has threads (the county and tract
    levels of a few states: one shard a state) still uses every worker. A shard task solves on
    its one thread (no pool on a worker: see ``stages.stage_shard``); without this the other
    workers idled meanwhile (10 M persons, 2 workers: county and tract levels at 104-106% CPU).
    The task secedes from its worker's thread pool while it waits, so that worker takes items
    too. Results are the same as locally: the engine forms its batches over the whole level,
    whatever the number of work items."""

    def __init__(self, threads: int) -> None:
        self.threads = max(1, int(threads))

    @property
    def chunks(self) -> int:
        """How many work items to cut a level's parents into (as :attr:`Executor.chunks`)."""
        return self.threads * CHUNKS_PER_WORKER

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """``[fn(x) for x in items]`` as tasks on the cluster, in order."""
        from distributed import worker_client

        with worker_client() as client:
            return list(client.gather(client.map(fn, list(items), pure=False)))


def cluster_threads() -> int:
    """Threads of the Dask cluster when this code runs in one of its tasks, else 0 (never
    imports ``distributed``: a process that has not is not a Dask worker)."""
    mod = sys.modules.get("distributed")
    if mod is None:
        return 0
    try:
        mod.get_worker()
    except ValueError:
        return 0
    return int(sum(mod.get_client().nthreads().values()))


class DaskExecutor:
    """Runs items as tasks on an existing ``distributed`` cluster (``tcp://host:port``)."""

    def __init__(self, address: str) -> None:
        from distributed import Client  # optional dependency: pip install 'dptab[dask]'

        self.address = address
        self.client = Client(address, set_as_default=False, timeout="60s")

    def map(self, fn: Callable[[T], R], items: Sequence[T],
            on_done: Callable[[int, int], None] | None = None) -> list[R]:
        """``[fn(x) for x in items]`` as cluster tasks (``fn`` importable on the workers)."""
        from distributed import as_completed as dask_completed

        futures = self.client.map(fn, list(items), pure=False)
        if on_done is not None:
            for k, _ in enumerate(dask_completed(futures), start=1):
                on_done(k, len(futures))
        return list(self.client.gather(futures))

    def close(self) -> None:
        self.client.close()
