"""The Ray pool's choices without Ray: which calls a frame becomes, and the actors' reducers per run."""

from __future__ import annotations

import pytest

from fiberlake.jobs import executors, reduce_worker
from fiberlake.jobs.reduce_worker import ReducerContext, ReducerHost


def _pool(n_actors: int, frame_calls: str) -> tuple[executors.RayPool, list]:
    """A RayPool of ``n_actors`` fake actors whose submitted calls are recorded as ``(actor, method)``."""
    pool = object.__new__(executors.RayPool)
    pool.actors, pool.frame_calls, pool.n_tiles, pool.n_bundles = [object()] * n_actors, frame_calls, 2, 3
    sent = []

    def call(actor, method, *args, num_returns=1):
        sent.append((actor, method))
        return [f"{method}-ref"] * num_returns if num_returns != 1 else f"{method}-ref"

    def drive(calls, launch):
        for i, c in enumerate(calls):
            yield c, launch(c, i % n_actors)

    pool._call, pool._drive = call, drive
    return pool, sent


def _frame(i: int) -> tuple:
    return ({"expid": i}, "night", "calib", {}, ("box",))


@pytest.mark.parametrize("total, whole", [(5, 4), (2, 1), (1, 0), (None, 5)])
def test_frames_are_whole_calls_while_enough_are_left_then_spread(total, whole):
    pool, sent = _pool(2, "auto")
    list(pool.reduce_frames([_frame(i) for i in range(5)], total))
    assert [m for _, m in sent].count("reduce") == whole
    graph = [m for _, m in sent if m != "reduce"]
    assert graph == ["read", "correct", "correct", "cut", "extract", "extract", "extract", "finish"] * (5 - whole)
    if whole < 5:  # a spread frame's tiles and bundles go to every actor
        assert {a for a, m in sent if m in ("correct", "extract")} == {0, 1}


def test_frame_calls_can_be_forced():
    pool, sent = _pool(2, "graph")
    list(pool.reduce_frames([_frame(i) for i in range(3)], 3))
    assert "reduce" not in {m for _, m in sent}
    pool, sent = _pool(4, "whole")
    list(pool.reduce_frames([_frame(0)], 1))
    assert sent == [(0, "reduce")]


def test_a_context_is_its_lake_and_parameters():
    a = ReducerContext.of("/lake", {"x": 1, "y": [1, 2]})
    assert a.key == ReducerContext.of("/lake", {"y": [1, 2], "x": 1}).key
    assert a.key != ReducerContext.of("/other", {"x": 1, "y": [1, 2]}).key
    assert a.key != ReducerContext.of("/lake", {"x": 2, "y": [1, 2]}).key


def test_a_host_keeps_one_reducer_per_run_and_the_latest_runs(monkeypatch):
    made = []

    class Reducer:
        def __init__(self, lake_root, config, cpus=None):
            made.append((lake_root, config["n"], cpus))

        def echo(self, value):
            return (len(made), value)

    monkeypatch.setattr(reduce_worker, "FrameReducer", Reducer)
    host = ReducerHost(cpus=1)
    runs = [ReducerContext.of(f"/lake{i}", {"n": i}) for i in range(3)]
    assert host.call(runs[0], "echo", "a") == (1, "a")
    assert host.call(runs[0], "echo", "b") == (1, "b")          # the same run: its reducer again
    host.call(runs[1], "echo", "c")
    host.call(runs[0], "echo", "d")                             # run 0 used last: run 1 is the oldest
    host.call(runs[2], "echo", "e")                             # a third run: run 1's reducer dropped
    assert list(host._reducers) == [runs[0].key, runs[2].key]
    assert made == [("/lake0", 0, 1), ("/lake1", 1, 1), ("/lake2", 2, 1)]
