"""Where reducers run: in this process (``--no-ray``) or as Ray actors, behind one interface.

Both pools call methods of :class:`~fiberlake.jobs.reduce_worker.FrameReducer` and yield
``(call, result)`` pairs; a call that raised (a Ray actor that died for good) yields the
exception as its result, so the driver records it and goes on.

:class:`RayPool` starts ``n_actors`` stateful actors (each loads calibration sets once and keeps
them; ``num_gpus`` per actor, fractions allowed, when the cluster has GPUs, CPU actors when it
has none), keeps at most ``max_in_flight`` calls per actor outstanding (the driver never holds
more than ``n_actors * max_in_flight`` results: backpressure), and restarts an actor that dies
(``max_restarts``), retrying its calls there (``max_task_retries``).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from fiberlake.jobs.reduce_worker import FrameReducer

Call = tuple[Any, ...]


class LocalPool:
    """One reducer in this process; calls run in order."""

    def __init__(self, lake_root: str, config: dict):
        self.reducer = FrameReducer(lake_root, config)

    def map(self, method: str, calls: Iterable[Call]) -> Iterator[tuple[Call, Any]]:
        """Run ``method`` on every call, yielding ``(call, result)`` as each finishes."""
        fn = getattr(self.reducer, method)
        for call in calls:
            yield call, fn(*call)

    def reduce_frames(self, calls: Iterable[Call]) -> Iterator[tuple[Call, Any]]:
        """Reduce frames (``(exp, calib_night, calib_id, fibermap)`` calls) one after the other."""
        return self.map("reduce", calls)

    def close(self) -> None:
        """Nothing to release."""


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Start (or join, with ``address``) Ray without the dashboard; a no-op when already connected."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "ignore_reinit_error": True, "log_to_driver": False,
                              "configure_logging": False}
    if address:
        kwargs["address"] = address
    else:
        kwargs["num_cpus"] = num_cpus or os.cpu_count()
        env = {k: v for k, v in os.environ.items() if k.startswith(("FIBERLAKE_", "AWS_")) or k == "PYTHONPATH"}
        if env:  # workers see the driver's fiberlake and object-store settings (and its source tree)
            kwargs["runtime_env"] = {"env_vars": env}
    ray.init(**kwargs)


class RayPool:
    """Stateful Ray actors running :class:`FrameReducer`, with bounded calls in flight.

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
    """

    def __init__(self, lake_root: str, config: dict, *, n_actors: int = 2, num_gpus: float = 1.0,
                 max_in_flight: int = 2, address: str | None = None, max_restarts: int = 3,
                 max_task_retries: int = 3, num_cpus: int = 1):
        import ray

        init_ray(address, num_cpus=None)
        has_gpu = ray.cluster_resources().get("GPU", 0) > 0
        options = {"num_cpus": num_cpus, "num_gpus": num_gpus if has_gpu else 0,
                   "max_restarts": max_restarts, "max_task_retries": max_task_retries}
        actor_class = ray.remote(FrameReducer).options(**options)
        self.actors = [actor_class.remote(lake_root, config) for _ in range(n_actors)]
        ray.get([a.ping.remote() for a in self.actors])
        self.n_bundles = ray.get(self.actors[0].n_bundles.remote())
        self.max_in_flight = max_in_flight
        self.device = "gpu" if options["num_gpus"] else "cpu"

    def map(self, method: str, calls: Iterable[Call]) -> Iterator[tuple[Call, Any]]:
        """Run ``method`` on every call across the actors, yielding ``(call, result)`` as they complete."""
        return self._drive(calls, lambda call, actor: getattr(self.actors[actor], method).remote(*call))

    def reduce_frames(self, calls: Iterable[Call]) -> Iterator[tuple[Call, Any]]:
        """Reduce frames, each as a small graph of actor calls, yielding ``(call, result)`` as frames finish.

        A frame ``(exp, calib_night, calib_id, fibermap)`` is prepared on the least loaded
        actor, which returns one Ray object per fiber-bundle slab; its bundles are extracted on
        all the actors in turn (each fetches only its slab); the actor that prepared it joins
        them. The calls carry object references, so the driver never holds pixels. Actors run
        their calls in submission order, and every call depends only on calls submitted before
        it, so the graph always makes progress.
        """
        turn = itertools.cycle(range(len(self.actors)))

        def launch(call: Call, home: int):
            exp, calib_night, calib_id, fibermap = call
            home_actor = self.actors[home]
            prepared, *slabs = home_actor.prepare.options(num_returns=self.n_bundles + 1).remote(
                exp, calib_night, calib_id)
            parts = [self.actors[next(turn)].extract.remote(prepared, slab) for slab in slabs]
            return home_actor.finish.remote(exp, fibermap, prepared, *parts)

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
            return True

        while submit():
            pass
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            actor, call = in_flight.pop(ready[0])
            load[actor] -= 1
            try:
                result = ray.get(ready[0])
            except Exception as err:  # the actor died for good, or the call raised
                result = err
            while submit():
                pass
            yield call, result

    def close(self) -> None:
        """Stop the actors (Ray itself stays up for the next job in this process)."""
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
