"""Where the runs of a sweep execute: in this process, in local worker processes, or as Ray tasks.

An executor has the ``submit(call) -> Future`` interface of :mod:`concurrent.futures`; :func:`stream` keeps
it busy and hands results back in the parent as they finish. What a task computes is decided by its call
alone (a run is seeded by its spec), so the same sweep gives the same numbers on every executor:

- :class:`Sequential`: each call runs in this process when it is submitted (the default everywhere).
- :class:`LocalWorkers`: ``n`` processes of this machine (forkserver or spawn), one torch thread each. They share this
  machine's disk, so a bench's workers write their records themselves. A worker whose parent dies
  (``SIGKILL`` included) exits at once.
- :class:`RayExecutor`: one Ray task per call (``ray`` is the optional extra ``groupmixnorm[distributed]``),
  on a cluster that may span machines, so results come back to the parent, which writes the records.
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Any, TypeVar

K = TypeVar("K")
R = TypeVar("R")

#: How to install the Ray executor's dependency.
RAY_EXTRA = 'pip install "groupmixnorm[distributed]"'


class ExecutorError(OSError):
    """An executor could not start, could not reach its cluster, or lost a worker process (one line)."""


class Executor:
    """Runs zero-argument calls and returns a :class:`~concurrent.futures.Future` for each.

    A call is pickled to reach a worker (a module-level function or a :func:`functools.partial` of one).
    Executors are context managers; leaving the block closes the executor (aborting what still runs if the
    block raised). Until then one executor may serve many sweeps; a closed one starts again on its next
    :meth:`submit`.
    """

    #: Whether calls run where this process's files are, so that a task may write results itself.
    shares_disk: bool = True
    #: Whether calls run in this process, so that their results need not be picklable.
    in_process: bool = False
    #: torch intra-op threads of every task (``None``: whatever this process has).
    threads: int | None = None

    @property
    def slots(self) -> int:
        """How many calls run at once."""
        return 1

    def submit(self, call: Callable[[], R]) -> Future:
        """Start ``call``; its future holds the result or the exception it raised."""
        raise NotImplementedError

    def result(self, future: Future) -> Any:
        """The result of a finished ``future``, with the executor's own failures as :class:`ExecutorError`."""
        return future.result()

    def share(self, value: Any) -> Any:
        """``value`` as an argument of many calls (Ray stores it once in the cluster; others pass it as is)."""
        return value

    def close(self, *, abort: bool = False) -> None:
        """Release the workers: after the calls that run have finished, or at once with ``abort``."""

    def describe(self) -> str:
        """A few words for a progress bar, e.g. ``2 workers``."""
        return "this process"

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        self.close(abort=kind is not None)


class Sequential(Executor):
    """Every call in this process, one after another, at the moment it is submitted."""

    in_process = True

    def submit(self, call: Callable[[], R]) -> Future:
        future: Future = Future()
        try:
            future.set_result(call())
        except Exception as error:  # noqa: BLE001 - handed back through the future, as a pool would
            future.set_exception(error)
        return future


def default_workers() -> int:
    """As many workers as this process may use cores, less one for the parent when there are more than two."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores - 1 if cores > 2 else cores


def check_count(value: Any, name: str) -> int:
    """``value`` if it is a whole number of at least one, else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")
    return value


class LocalWorkers(Executor):
    """``workers`` processes of this machine (default :func:`default_workers`), ``threads`` torch threads each.

    Processes start at the first submit (see :func:`_worker_context`) and stay until :meth:`close`, each
    running one call at a time.
    """

    def __init__(self, workers: int | None = None, *, threads: int = 1) -> None:
        self.workers = default_workers() if workers is None else check_count(workers, "workers")
        self.threads = check_count(threads, "threads")
        self._pool: Any = None

    @property
    def slots(self) -> int:
        return self.workers

    def describe(self) -> str:
        return f"{self.workers} worker{'s' if self.workers > 1 else ''}"

    @property
    def pids(self) -> list[int]:
        """The process ids of the workers started so far (none before the first submit)."""
        return [process.pid for process in (getattr(self._pool, "_processes", None) or {}).values()]

    def submit(self, call: Callable[[], R]) -> Future:
        if self._pool is None:
            from concurrent.futures import ProcessPoolExecutor

            self._pool = ProcessPoolExecutor(self.workers, mp_context=_worker_context(), initializer=_start_worker,
                                             initargs=(self.threads,))
        return self._pool.submit(call)

    def result(self, future: Future) -> Any:
        from concurrent.futures.process import BrokenProcessPool

        try:
            return future.result()
        except BrokenProcessPool:
            raise ExecutorError("a worker process ended abruptly (killed, out of memory, or unable to start); "
                                "what finished before is kept") from None

    def close(self, *, abort: bool = False) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        if not abort:
            pool.shutdown(wait=True)
            return
        # Before Python 3.14 a pool cannot stop the tasks it runs; its processes are ended instead.
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.terminate()
        for process in processes:
            process.join(timeout=5)


#: Modules a forkserver imports once, so that its workers start in milliseconds rather than each importing torch.
WORKER_PRELOAD = ("groupmixnorm.experiments.bench", "groupmixnorm.experiments.constraint")


def _worker_context() -> Any:
    """``forkserver`` where the platform has it (a clean process forked from one that preloaded the
    package), else ``spawn``; never ``fork``, which would copy this process's state, threads included."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(WORKER_PRELOAD))
    return context


def _start_worker(threads: int) -> None:
    """In each worker: its torch threads; Ctrl-C left to the parent (which ends the workers); and an exit
    as soon as the process that asked for the worker is gone, so that a killed parent leaves no worker
    behind. (A forkserver is the worker's parent in the process tree, and lives as long as its workers do:
    it is the pool's process that is watched.)"""
    import torch

    torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, daemon=True).start()


def _exit_with_parent() -> None:
    import multiprocessing

    parent = multiprocessing.parent_process()
    if parent is None:
        return
    parent.join()  # returns when the parent's end of a pipe closes: when it exits, however it dies
    os._exit(1)  # a run left half-done never wrote its record (writes are atomic)


class RayExecutor(Executor):
    """Each call a Ray task asking ``cpus`` CPUs and running ``threads`` torch threads.

    ``address`` is what :func:`ray.init` takes: ``"auto"`` (``RAY_ADDRESS``, else the cluster that
    ``ray start`` started on this machine) or the head's ``HOST:PORT`` (port 6379 unless ``ray start``
    was told otherwise). If this process is connected to Ray already (``ray.init`` called before), that
    connection is used and left open. Every machine of the cluster needs this package installed, at the same
    version.
    """

    shares_disk = False

    def __init__(self, address: str | None = "auto", *, cpus: int = 1, threads: int = 1) -> None:
        self.address = address
        self.cpus = check_count(cpus, "cpus")
        self.threads = check_count(threads, "threads")
        self._ray: Any = None
        self._task: Any = None
        self._started_here = False
        self._refs: dict[Future, Any] = {}

    def connect(self) -> Any:
        """The ``ray`` module, connected (:class:`ExecutorError` with one line if it cannot be)."""
        if self._ray is not None:
            return self._ray
        ray = _import_ray()
        if not ray.is_initialized():
            import logging

            advice = "start one with `ray start --head`, or give the head's HOST:PORT"
            _probe(self.address, advice)
            try:
                ray.init(address=self.address, logging_level=logging.ERROR)
            except ConnectionError:
                where = "RAY_ADDRESS is not set and none was started on this machine" if self.address == "auto" \
                    else f"none answered at {self.address}"
                raise ExecutorError(f"no Ray cluster to connect to ({where}): {advice}") from None
            except Exception as error:  # noqa: BLE001 - ray's own errors for an address it cannot use
                reason = " ".join(str(error).split()) or type(error).__name__
                raise ExecutorError(f"no Ray cluster at {self.address!r}: {reason[:300]} ({advice})") from None
            self._started_here = True
        self._ray = ray
        self._task = ray.remote(_call_with_threads).options(num_cpus=self.cpus)
        return ray

    @property
    def slots(self) -> int:
        cpus = int(self.connect().cluster_resources().get("CPU", 1))
        return max(1, cpus // self.cpus)

    def describe(self) -> str:
        return f"Ray, {self.slots} task(s) at once"

    def submit(self, call: Callable[[], R]) -> Future:
        self.connect()
        ref = self._task.remote(self.threads, call)
        future = ref.future()
        self._refs[future] = ref
        future.add_done_callback(lambda done: self._refs.pop(done, None))
        return future

    def share(self, value: Any) -> Any:
        return _Shared(self.connect().put(value))

    def result(self, future: Future) -> Any:
        from ray import exceptions

        try:
            return future.result()
        except exceptions.RayTaskError as error:  # the call's own exception, as the other executors raise it
            cause = error.cause
            raise (cause if isinstance(cause, BaseException) else error) from None
        except exceptions.RayError as error:
            raise ExecutorError(f"Ray lost a task: {' '.join(str(error).split())[:300]}") from None

    def close(self, *, abort: bool = False) -> None:
        ray = self._ray
        if ray is None:
            return
        if abort:
            for ref in list(self._refs.values()):
                ray.cancel(ref, force=True)
        self._refs.clear()
        if self._started_here:
            ray.shutdown()
        self._ray, self._task, self._started_here = None, None, False


#: Seconds to wait for a Ray head to answer before calling it unreachable (ray.init itself retries for minutes).
PROBE_SECONDS = 5.0


def _probe(address: str | None, advice: str) -> None:
    """:class:`ExecutorError` unless the head at ``address`` (``HOST:PORT``, or ``RAY_ADDRESS`` for
    ``"auto"``) accepts a connection; ``"auto"`` without ``RAY_ADDRESS`` is left to Ray, which answers at once."""
    import socket

    if address == "auto":
        address = os.environ.get("RAY_ADDRESS")
    if not address or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ExecutorError(f"--ray {address!r}: expected auto or the head's HOST:PORT, such as 10.0.0.1:6379")
    try:
        socket.create_connection((host, int(port)), timeout=PROBE_SECONDS).close()
    except OSError as error:
        raise ExecutorError(f"no Ray cluster answers at {address} ({' '.join(str(error).split()) or 'no answer'}; "
                            f"waited up to {PROBE_SECONDS:g} s): {advice}") from None


class _Shared:
    """A value stored once in Ray's object store, fetched (and cached per worker process) by the calls."""

    _cache: dict[str, Any] = {}

    def __init__(self, ref: Any) -> None:
        self.ref = ref

    def get(self) -> Any:
        import ray

        key = self.ref.hex()
        if key not in _Shared._cache:
            _Shared._cache.clear()  # one shared value at a time: a search's data
            _Shared._cache[key] = ray.get(self.ref)
        return _Shared._cache[key]


def shared_value(value: Any) -> Any:
    """What a call receives from :meth:`Executor.share`: the value itself."""
    return value.get() if isinstance(value, _Shared) else value


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ExecutorError(f"the Ray executor needs ray, an optional dependency: {RAY_EXTRA}") from None
    return ray


def _call_with_threads(threads: int, call: Callable[[], R]) -> R:
    import torch

    torch.set_num_threads(threads)
    return call()


def stream(executor: Executor, ready: Callable[[int], Iterable[tuple[K, Callable[[], R]]]]) -> Iterator[tuple[K, R]]:
    """Run calls on ``executor`` as they become ready; yield ``(key, result)`` in the parent as each finishes.

    ``ready(free)`` returns at most ``free`` pairs ``(key, call)`` that may start now (it is asked again
    after every batch of results, so later calls may depend on earlier results). At most
    ``executor.slots`` calls run at once; calls that finish together are yielded in the order they were
    submitted. The stream ends when nothing runs and ``ready`` has nothing. If a call fails, or the
    consumer stops early, what is queued is cancelled and the executor is closed with ``abort``.
    """
    running: dict[Future, tuple[int, K]] = {}
    order = itertools.count()
    try:
        while True:
            for key, call in ready(max(0, executor.slots - len(running))):
                running[executor.submit(call)] = (next(order), key)
            if not running:
                return
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in sorted(done, key=lambda item: running[item][0]):
                _, key = running.pop(future)
                yield key, executor.result(future)
    except BaseException:
        executor.close(abort=True)
        raise


def stream_all(executor: Executor, calls: Iterable[tuple[K, Callable[[], R]]]) -> Iterator[tuple[K, R]]:
    """:func:`stream` over a fixed sequence of ``(key, call)`` pairs, started in their order."""
    pending = iter(calls)
    return stream(executor, lambda free: list(itertools.islice(pending, free)))


def executor_for(workers: int | None = None, ray: str | None = None, *, threads: int | None = None) -> Executor:
    """The executor of the command line's ``--workers N`` or ``--ray ADDRESS``: :class:`Sequential` for
    neither, or for one worker. ``threads`` is each task's torch threads (default 1)."""
    if workers is not None and ray is not None:
        raise ValueError("give --workers N (processes of this machine) or --ray ADDRESS (a Ray cluster), not both")
    if ray is not None:
        return RayExecutor(ray, threads=threads or 1)
    if workers is None or check_count(workers, "--workers") == 1:
        return Sequential()
    return LocalWorkers(workers, threads=threads or 1)
