"""Where reducers run: in this process (``--no-ray``) or as Ray actors, behind one interface.

Both pools call methods of :class:`~fiberlake.jobs.reduce_worker.FrameReducer` and yield
``(call, result)`` pairs; a call that raised (a Ray actor that died for good) yields the
exception as its result, so the driver records it and goes on. A run makes one pool
(:class:`LazyPool`, on first use): its frames and then the units of the neural stages after the
products (labels per exposure and spectrograph, denoising per chunk of spectra) run on the same
reducers; the driver commits every result.

:class:`RayPool` starts ``n_actors`` stateful actors (each loads calibration sets once and keeps
them; ``num_gpus`` per actor, fractions allowed, when the cluster has GPUs, CPU actors when it
has none), keeps at most ``max_in_flight`` calls per actor outstanding (the driver never holds
more than ``n_actors * max_in_flight`` results: backpressure), and restarts an actor that dies
(``max_restarts``), retrying its calls there (``max_task_retries``). When a run ends its actors
are kept for the next run of this process (one set of actors at a time, stopped by
:func:`shutdown_ray` or when a pool of another shape is made), so ``watch`` and ``reprocess`` pay
the actors' start (worker processes, imports) once.

A local Ray (no ``address``) ends with the job that started it, however the job ends (exit,
exception, SIGTERM, SIGKILL): :func:`init_ray` starts it from a watchdog child in a session of its
own (:func:`serve_local_cluster`), under a temporary directory of its own. The watchdog holds the
read end of a pipe whose write end only the driver holds; when the driver is gone the pipe reads
end-of-file and the watchdog stops Ray, then signals every process left in its session (gcs_server,
raylet, agents, workers: Ray's processes never leave the session they are started in; workers only
change their process group), then removes the temporary directory. The local cluster uses token
authentication with a token of this process (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN``) unless
``RAY_AUTH_MODE`` is set: Ray prints a notice on every start when the mode is not set explicitly.
"""

from __future__ import annotations

import atexit
import itertools
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

Call = tuple[Any, ...]

LOCAL_RAY_START_TIMEOUT_S = 180.0
"""How long :func:`init_ray` waits for a local Ray to start."""


class LocalPool:
    """One reducer in this process; calls run in order."""

    def __init__(self, lake_root: str, config: dict):
        from fiberlake.jobs.reduce_worker import FrameReducer  # not at import: the Ray watchdog imports this module

        self.reducer = FrameReducer(lake_root, config)

    def map(self, method: str, calls: Iterable[Call]) -> Iterator[tuple[Call, Any]]:
        """Run ``method`` on every call, yielding ``(call, result)`` as each finishes."""
        fn = getattr(self.reducer, method)
        for call in calls:
            yield call, fn(*call)

    def reduce_frames(self, calls: Iterable[Call], total: int | None = None) -> Iterator[tuple[Call, Any]]:
        """Reduce frames (``(exp, calib_night, calib_id, fibermap, methods)`` calls) one after the other
        (``total``, the number of calls, is not needed here)."""
        return self.map("reduce", calls)

    def close(self) -> None:
        """Nothing to release."""


class LazyPool:
    """A run's pool, made on first use and closed once: the frames and the stages after the products
    share it (the same reducers, the same Ray actors), and a run with nothing to do starts none.

    Parameters
    ----------
    make : callable
        Returns the pool (:class:`LocalPool` or :class:`RayPool`).
    """

    def __init__(self, make: Callable[[], Any]):
        self._make = make
        self._pool = None
        self._error: Exception | None = None

    @property
    def pool(self):
        """The pool, made now if it was not yet (a pool that could not be made is not tried again)."""
        if self._error is not None:
            raise self._error
        if self._pool is None:
            try:
                self._pool = self._make()
            except Exception as err:  # e.g. Ray did not start: every later use fails the same way, at once
                self._error = err
                raise
        return self._pool

    def map(self, method: str, calls: Iterable[Call]) -> Iterator[tuple[Call, Any]]:
        """:meth:`LocalPool.map` / :meth:`RayPool.map` of the pool."""
        return self.pool.map(method, calls)

    def reduce_frames(self, calls: Iterable[Call], total: int | None = None) -> Iterator[tuple[Call, Any]]:
        """:meth:`LocalPool.reduce_frames` / :meth:`RayPool.reduce_frames` of the pool."""
        return self.pool.reduce_frames(calls, total)

    def close(self) -> None:
        """Close the pool if it was made."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()


@contextmanager
def pool_or_local(pool, lake_root: str, config: dict) -> Iterator[Any]:
    """``pool``, or (when None) a :class:`LocalPool` made on first use and closed on leaving: a stage
    called on its own runs its units in this process."""
    if pool is not None:
        yield pool
        return
    own = LazyPool(lambda: LocalPool(lake_root, config))
    try:
        yield own
    finally:
        own.close()


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join Ray at ``address``, or start a local Ray that ends with this process; a no-op when connected.

    The local Ray has ``num_cpus`` CPUs (all of this machine's by default), no dashboard, and its
    own temporary directory (under ``RAY_TMPDIR`` or the system's temporary directory); its
    workers see the driver's ``FIBERLAKE_*``, ``AWS_*`` and ``PYTHONPATH`` settings.
    """
    import ray

    global _kept
    if ray.is_initialized():
        return
    _kept = None  # actors kept on an earlier connection went with it
    kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": False, "configure_logging": False}
    if address:
        kwargs["include_dashboard"] = False
        kwargs["address"] = address
    else:
        kwargs["address"] = _start_local_cluster(num_cpus or os.cpu_count() or 1)
        env = {k: v for k, v in os.environ.items() if k.startswith(("FIBERLAKE_", "AWS_")) or k == "PYTHONPATH"}
        if env:  # workers see the driver's fiberlake and object-store settings (and its source tree)
            kwargs["runtime_env"] = {"env_vars": env}
    ray.init(**kwargs)


def shutdown_ray(timeout: float = 30.0) -> None:
    """Disconnect from Ray and end the local Ray this process started, waiting up to ``timeout`` seconds."""
    import ray

    if ray.is_initialized():
        release_kept_actors()
    ray.shutdown()
    _stop_local_cluster(timeout)


_local_cluster: subprocess.Popen | None = None
"""The watchdog of the local Ray this process started (its stdin is the pipe that keeps it up)."""


def prestart_local_ray(num_cpus: int | None = None) -> None:
    """Start the local Ray that :func:`init_ray` will join, in the background, and return at once.

    A command that will run on a local Ray calls it first, so that Ray's start (a watchdog process,
    then Ray's own processes, several seconds) overlaps the command's imports and its reading of
    the lake; ``init_ray`` then only waits for what is left of it. A no-op when this process is
    connected or has a local Ray started or starting. The local Ray ends with this process as
    always, also when ``init_ray`` is never called.
    """
    global _starting
    if _local_cluster is not None or _starting is not None or "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return
    _starting = _launch_watchdog(num_cpus or os.cpu_count() or 1)


def _start_local_cluster(num_cpus: int) -> str:
    """Start a local Ray from a watchdog child in its own session; return the Ray address to join.

    Takes over a watchdog :func:`prestart_local_ray` launched, when there is one."""
    global _local_cluster, _starting
    starting, _starting = _starting, None
    if starting is None:
        _stop_local_cluster()  # one left by an earlier init_ray of this process, since disconnected (ray.shutdown)
        starting = _launch_watchdog(num_cpus)
    proc, temp_dir, log_path, launched = starting
    address = b""
    deadline = launched + LOCAL_RAY_START_TIMEOUT_S
    while not address.endswith(b"\n") and proc.poll() is None and time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 0.5)[0]:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            address += chunk
    if not address.endswith(b"\n"):
        proc.stdin.close()  # the watchdog stops whatever it started
        proc.stdout.close()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        with open(log_path, "rb") as f:
            tail = f.read().decode(errors="replace").strip().splitlines()[-5:]
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise RuntimeError("local Ray did not start: " + (" | ".join(tail) or f"no address in {LOCAL_RAY_START_TIMEOUT_S:.0f} s"))
    proc.stdout.close()
    if not _atexit_registered:
        _register_atexit()
    _local_cluster = proc
    return address.decode().strip()


_starting: tuple[subprocess.Popen, str, str, float] | None = None
"""A watchdog :func:`prestart_local_ray` launched, not yet joined: ``(process, temp dir, log, launched at)``."""


def _launch_watchdog(num_cpus: int) -> tuple[subprocess.Popen, str, str, float]:
    """Launch the watchdog that starts a local Ray of ``num_cpus`` CPUs (:func:`serve_local_cluster`)."""
    if "RAY_AUTH_MODE" not in os.environ:
        _use_token_auth()
    temp_dir = tempfile.mkdtemp(prefix="fiberlake-ray-", dir=os.environ.get("RAY_TMPDIR"))
    log_path = os.path.join(temp_dir, "watchdog.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from fiberlake.jobs.executors import serve_local_cluster; serve_local_cluster()",
             str(num_cpus), temp_dir],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, start_new_session=True)
    return proc, temp_dir, log_path, time.monotonic()


_atexit_registered = False


def _register_atexit() -> None:
    """At a normal exit, end the local Ray before returning (a killed process leaves it to the watchdog).

    Registered after ``import ray``, so it runs before Ray's own exit handler.
    """
    global _atexit_registered
    _atexit_registered = True
    atexit.register(shutdown_ray, 30.0)


def _use_token_auth() -> None:
    """Token authentication, chosen explicitly (Ray's notice stays quiet), with a token of this process.

    The watchdog and Ray's processes inherit the setting; this process re-reads it as Ray's own
    ``ray.init`` does when it turns token authentication on, since Ray caches its configuration
    and token when first imported. The token is set once per process and never changed.
    """
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))  # not ~/.ray/auth_token: nothing written
    if "ray" not in sys.modules:  # Ray reads both when first imported
        return
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # a Ray without token authentication ignores both settings
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _stop_local_cluster(timeout: float = 0.0) -> None:
    """Let the watchdog end the local Ray (closing its pipe); wait up to ``timeout`` seconds for it."""
    global _local_cluster, _starting
    if _starting is not None:  # launched by prestart_local_ray and never joined
        _starting[0].stdin.close()
        _starting[0].stdout.close()
        _starting = None
    proc, _local_cluster = _local_cluster, None
    if proc is None:
        return
    proc.stdin.close()
    if timeout:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass


def serve_local_cluster() -> None:
    """The watchdog: start a local Ray, print its address, and end it with the driver.

    Run as ``python -c ... NUM_CPUS TEMP_DIR`` by :func:`init_ray` in a session of its own, with
    the driver's pipe on stdin. Prints the Ray address on stdout, then reads stdin until
    end-of-file (the driver exited, however it did, or let go of the cluster), stops Ray, and
    signals every process left in its session (SIGTERM, then SIGKILL after a grace period);
    removes ``TEMP_DIR``.
    """
    import ray

    num_cpus, temp_dir = int(sys.argv[1]), sys.argv[2]
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever Ray prints goes to the log, not into the address line
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        ray.init(num_cpus=num_cpus, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False,
                 configure_logging=False)
        out.write(ray.get_runtime_context().gcs_address + "\n")
        out.close()
        while os.read(0, 4096):
            pass
    except BaseException as err:  # noqa: BLE001 - the log says why; the cluster ends all the same
        print(f"fiberlake Ray watchdog: {err!r}", file=sys.stderr, flush=True)
    finally:
        stopper = threading.Thread(target=ray.shutdown, daemon=True)
        stopper.start()
        stopper.join(10)
        _end_session(grace=5.0)
        shutil.rmtree(temp_dir, ignore_errors=True)
        os._exit(0)  # no interpreter teardown under Ray's threads


def _session_members(sid: int) -> list[int]:
    """Live (not zombie) processes of session ``sid`` other than this one (Linux /proc; empty elsewhere)."""
    members = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return members
    for name in names:
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        state, session = fields[0], int(fields[3])
        if session == sid and state not in (b"Z", b"X"):
            members.append(int(name))
    return members


def _end_session(grace: float) -> None:
    """SIGTERM every other process of this session, SIGKILL those left after ``grace`` seconds."""
    sid = os.getsid(0)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _session_members(sid)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            try:
                while os.waitpid(-1, os.WNOHANG)[0]:
                    pass
            except ChildProcessError:
                pass
            time.sleep(0.1)
            pids = _session_members(sid)
        if not pids:
            return


class RayPool:
    """Stateful Ray actors running :class:`FrameReducer` methods, with bounded calls in flight.

    The actors (:class:`~fiberlake.jobs.reduce_worker.ReducerHost`) outlive the pool: :meth:`close`
    keeps them for the next pool of the same shape in this process (``keep``), which reuses them
    after a liveness check, so a driver that runs many jobs (``watch``, ``reprocess`` over nights,
    a benchmark) starts its actors once; each call names the run's lake and parameters
    (:class:`~fiberlake.jobs.reduce_worker.ReducerContext`). An actor runs its calls as their
    inputs become ready (Ray's ``allow_out_of_order_execution``), not in submission order.

    Parameters
    ----------
    lake_root : str
        Lake root (a path every node can read).
    config : dict
        Reduction parameters.
    n_actors : int
        Actors to start.
    num_gpus : float
        GPUs per actor when the cluster has GPUs (fractions share a GPU); 0 otherwise.
    max_in_flight : int
        Outstanding calls per actor.
    address : str, optional
        Ray cluster address (``ray://...`` or ``auto``); local Ray when omitted.
    max_restarts, max_task_retries : int
        Ray fault tolerance of the actors.
    num_cpus : int
        CPUs per actor (Ray sets the actor's ``OMP_NUM_THREADS`` to it).
    keep : bool
        Keep the actors for the next pool of this process (False: :meth:`close` stops them).
    frame_calls : str
        How :meth:`reduce_frames` spreads a frame: ``auto`` (one ``reduce`` call per frame while at
        least as many frames are left as there are actors, the call graph over all the actors for
        the last ones), ``whole`` or ``graph`` (always).
    out_of_order : bool
        Let an actor run a call whose inputs are ready before earlier calls still waiting for theirs.
    """

    def __init__(self, lake_root: str, config: dict, *, n_actors: int = 2, num_gpus: float = 1.0,
                 max_in_flight: int = 2, address: str | None = None, max_restarts: int = 3,
                 max_task_retries: int = 3, num_cpus: int = 1, keep: bool = True, frame_calls: str = "auto",
                 out_of_order: bool = True):
        import ray

        from fiberlake.jobs.reduce_worker import ReducerContext

        if frame_calls not in ("auto", "whole", "graph"):
            raise ValueError(f"frame_calls is auto, whole or graph, not {frame_calls!r}")
        init_ray(address, num_cpus=None)
        has_gpu = ray.cluster_resources().get("GPU", 0) > 0
        options = {"num_cpus": num_cpus, "num_gpus": num_gpus if has_gpu else 0,
                   "max_restarts": max_restarts, "max_task_retries": max_task_retries,
                   "allow_out_of_order_execution": bool(out_of_order)}
        self.shape = (n_actors, tuple(sorted(options.items())))
        self.context = ReducerContext.of(lake_root, config)
        self.keep = keep
        self.frame_calls = frame_calls
        self.started = False
        """True when this pool started its actors (False: it took actors an earlier pool kept)."""
        self.actors = _take_kept(self.shape)
        if self.actors is None:
            from fiberlake.jobs.reduce_worker import ReducerHost

            actor_class = ray.remote(ReducerHost).options(**options)
            self.actors = [actor_class.remote(cpus=num_cpus) for _ in range(n_actors)]
            self.started = True
            ray.get([a.ping.remote() for a in self.actors])
        self.n_bundles = self._get(0, "n_bundles")
        self.n_tiles = self._get(0, "n_tiles")
        self.max_in_flight = max_in_flight
        self.device = "gpu" if options["num_gpus"] else "cpu"
        self._in_flight = 0

    def _call(self, actor: int, method: str, *args, num_returns: int = 1):
        """Submit ``method(*args)`` of this run's reducer on actor ``actor``; its reference(s)."""
        remote = self.actors[actor].call
        if num_returns != 1:
            remote = remote.options(num_returns=num_returns)
        return remote.remote(self.context, method, *args)

    def _get(self, actor: int, method: str, *args):
        import ray

        return ray.get(self._call(actor, method, *args))

    def map(self, method: str, calls: Iterable[Call]) -> Iterator[tuple[Call, Any]]:
        """Run ``method`` on every call across the actors, yielding ``(call, result)`` as they complete."""
        return self._drive(calls, lambda call, actor: self._call(actor, method, *call))

    def reduce_frames(self, calls: Iterable[Call], total: int | None = None) -> Iterator[tuple[Call, Any]]:
        """Reduce frames, yielding ``(call, result)`` as frames finish.

        While at least as many frames are left (``total``, the frames ``calls`` holds, less those
        submitted; unknown counts as many) as there are actors, a frame ``(exp, calib_night,
        calib_id, fibermap, methods)`` is one ``reduce`` call on the least loaded actor: the
        actors work on different frames and no pixels move. The last frames (and every frame with
        ``frame_calls="graph"``) are a small graph of actor calls, so that one frame's work is spread
        over the actors: read on the least loaded actor, its column tiles corrected (cosmic rays,
        rectification) on all the actors in turn, joined by the first actor into one Ray object per
        fiber-bundle slab, its bundles extracted on all the actors in turn (each fetches only its
        slab), joined by the actor that prepared it. The calls carry object references, so the
        driver never holds pixels; every call depends only on calls submitted before it, so the
        graph always makes progress.
        """
        turn = itertools.cycle(range(len(self.actors)))
        left = [total]

        def launch(call: Call, home: int):
            whole = self.frame_calls == "whole" or (
                self.frame_calls == "auto" and (left[0] is None or left[0] >= len(self.actors)))
            if left[0] is not None:
                left[0] -= 1
            if whole:
                return self._call(home, "reduce", *call)
            exp, calib_night, calib_id, fibermap, methods = call
            # the frame's cosmic rays and rectification, tile by tile on all the actors in turn
            head, *inputs = self._call(home, "read", exp, calib_night, calib_id, methods, num_returns=self.n_tiles + 1)
            tiles = [self._call(next(turn), "correct", head, tile) for tile in inputs]
            prepared, *slabs = self._call(home, "cut", head, *tiles, num_returns=self.n_bundles + 1)
            parts = [self._call(next(turn), "extract", prepared, slab) for slab in slabs]
            return self._call(home, "finish", exp, fibermap, prepared, *parts)

        return self._drive(calls, launch)

    def _drive(self, calls: Iterable[Call], launch: Callable[[Call, int], Any]) -> Iterator[tuple[Call, Any]]:
        """Keep at most ``max_in_flight`` calls per actor outstanding; yield ``(call, result)`` as they complete.

        ``launch(call, actor)`` submits a call whose result is owed by actor ``actor`` (the least
        loaded) and returns the reference of that result. A call that raised (an actor that died
        for good) yields the exception as its result.
        """
        import ray

        pending = iter(calls)
        in_flight: dict[Any, tuple[int, Call]] = {}
        load = [0] * len(self.actors)

        def submit() -> bool:
            actor = min(range(len(self.actors)), key=load.__getitem__)
            if load[actor] >= self.max_in_flight:
                return False
            call = next(pending, None)
            if call is None:
                return False
            in_flight[launch(call, actor)] = (actor, call)
            load[actor] += 1
            self._in_flight += 1
            return True

        while submit():
            pass
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            actor, call = in_flight.pop(ready[0])
            load[actor] -= 1
            self._in_flight -= 1
            try:
                result = ray.get(ready[0])
            except Exception as err:  # the actor died for good, or the call raised
                result = err
            while submit():
                pass
            yield call, result

    def close(self) -> None:
        """Keep the actors for the next pool of this process (``keep``, and no call of this pool left
        running), else stop them. Ray itself stays up for the next job in this process."""
        actors, self.actors = self.actors, []
        if actors and self.keep and not self._in_flight:
            _keep(self.shape, actors)
        else:
            _kill(actors)


_kept: tuple[Any, list] | None = None
"""The actors the last closed :class:`RayPool` of this process kept: ``(shape, actors)``."""

KEPT_PING_TIMEOUT_S = 30.0
"""How long a pool waits for kept actors to answer before it starts new ones."""


def _keep(shape, actors: list) -> None:
    """Keep ``actors`` for the next pool of ``shape``; actors kept before (another shape) are stopped."""
    global _kept
    release_kept_actors()
    _kept = (shape, actors)


def _take_kept(shape) -> list | None:
    """The kept actors when they are of ``shape`` and all answer; otherwise None (and they are stopped).

    Kept actors of another shape are stopped too: they hold the CPUs (and GPUs) the new ones need.
    """
    import ray

    global _kept
    kept, _kept = _kept, None
    if kept is None:
        return None
    kept_shape, actors = kept
    if kept_shape == shape:
        try:
            ray.get([a.ping.remote() for a in actors], timeout=KEPT_PING_TIMEOUT_S)
            return actors
        except Exception:  # noqa: BLE001 - a kept actor died for good: start afresh
            pass
    _kill(actors)
    return None


def release_kept_actors() -> None:
    """Stop the actors a closed :class:`RayPool` kept (:func:`shutdown_ray` calls it)."""
    global _kept
    kept, _kept = _kept, None
    if kept is not None:
        _kill(kept[1])


def _kill(actors: list) -> None:
    import ray

    for actor in actors:
        try:
            ray.kill(actor)
        except Exception:  # noqa: BLE001 - already gone with its cluster
            pass
