"""Sweeps on executors: one process, local worker processes and a Ray head give the same records; a sweep
that loses a worker, or its parent, resumes with nothing redone; the constrained search likewise."""

from __future__ import annotations

import functools
import json
import os
import signal
from concurrent.futures import Future

import pytest

from groupmixnorm import cli
from groupmixnorm.experiments import bench, constraint
from groupmixnorm.experiments.executors import (
    ExecutorError, LocalWorkers, RayExecutor, Sequential, default_workers, executor_for, stream, stream_all,
)
from groupmixnorm.experiments.tabular_bench import run_tabular, tabular_plans
from groupmixnorm.training import TrainConfig

#: German with three methods: five runs of a small network, a few steps each.
METHODS = ["erm", "gapreg", "expgrad"]


def _plan(methods=METHODS) -> bench.BenchPlan:
    return tabular_plans(quick=True, datasets=["german"], methods=methods)[0]


def _numbers(record: dict) -> dict:
    """A record without its timings, in JSON form (as the store gives it back): what must not depend on where
    the run trained."""
    return json.loads(json.dumps({key: value for key, value in record.items() if key != "timings"}))


def _stored(folder) -> dict[str, dict]:
    return {path.name: _numbers(json.loads(path.read_text(encoding="utf-8"))) for path in sorted(folder.glob("*.json"))}


@pytest.fixture(scope="module")
def workers():
    """Two local workers for the module (they start once)."""
    with LocalWorkers(2) as executor:
        yield executor


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The plan run in this process, one torch thread (the test session's): the records to match."""
    store = bench.RecordStore(tmp_path_factory.mktemp("sequential"))
    return bench.run_plan(_plan(), store), store.root


# ------------------------------------------------------------------------------------- the same records


def test_two_workers_give_the_records_of_one_process_and_write_them_themselves(reference, workers, tmp_path):
    records, folder = reference
    seen = []
    got = bench.run_plan(_plan(), bench.RecordStore(tmp_path), executor=workers,
                         on_run=lambda spec, record, reused: seen.append((spec.key(), reused)))
    assert [_numbers(r) for r in got] == [_numbers(r) for r in records]  # plan order, every digit
    assert _stored(tmp_path) == _stored(folder)
    assert sorted(seen) == sorted((spec.key(), False) for spec in _plan().specs())


def test_the_order_of_runs_in_one_process_does_not_change_a_record(reference, tmp_path):
    records, _ = reference
    plan = _plan()
    backwards = bench.BenchPlan(plan.name, plan.settings[::-1], plan.seeds, plan.config, protocol=plan.protocol,
                                dataset=plan.dataset, sensitive=plan.sensitive)
    got = bench.run_plan(backwards, bench.RecordStore(tmp_path))
    assert [_numbers(r) for r in got[::-1]] == [_numbers(r) for r in records]


def _require_ray():
    if os.environ.get("CI") or os.environ.get("GROUPMIXNORM_REQUIRE_RAY"):
        import ray  # in CI the extra is installed: a missing ray fails here
    else:
        ray = pytest.importorskip("ray", reason='the Ray executor needs ray: pip install "groupmixnorm[distributed]"')
    return ray


def test_a_local_ray_head_gives_the_same_records_written_by_the_parent(reference, planted, tmp_path):
    ray = _require_ray()
    records, folder = reference
    alone = _search(planted)
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        executor = RayExecutor()
        assert executor.slots == 2 and not executor.shares_disk
        got = bench.run_plan(_plan(), bench.RecordStore(tmp_path), executor=executor)
        assert _search(planted, executor)[1].equals(alone[1])  # the data reach the tasks through Ray's store
        failed = executor.submit(functools.partial(constraint.check_bound, "no_such_gap", 0.1))
        with pytest.raises(ValueError, match="not a gap metric"):  # the task's own error, not Ray's wrapper
            executor.result(failed)
        executor.close()
        assert ray.is_initialized()  # a connection it did not open is left open
    finally:
        ray.shutdown()
    assert [_numbers(r) for r in got] == [_numbers(r) for r in records]
    assert _stored(tmp_path) == _stored(folder)


def test_the_cli_bench_with_workers_writes_the_same_records(reference, tmp_path):
    records, folder = reference
    argv = ["bench", "tabular", "--quick", "--datasets", "german", "--methods", ",".join(METHODS), "--quiet",
            "--results-dir", str(tmp_path), "--workers", "2"]
    assert cli.main(argv) == 0
    assert _stored(tmp_path / "tabular" / "german" / "records") == _stored(folder)
    report = (tmp_path / "tabular.md").read_text(encoding="utf-8")
    assert "--workers" not in report  # where the runs trained is not part of the bench's command


# ------------------------------------------------------------------------------------------ resuming


def test_a_killed_worker_stops_the_sweep_and_the_rerun_trains_only_what_is_missing(tmp_path, monkeypatch):
    plan = _plan(["erm", "gapreg", "fairmixup", "adversarial"])
    store = bench.RecordStore(tmp_path)
    executor = LocalWorkers(2)

    def kill_a_worker(spec, record, reused):
        if not killed:
            killed.append(executor.pids[0])
            os.kill(killed[0], signal.SIGKILL)

    killed: list[int] = []
    with executor, pytest.raises(ExecutorError, match="ended abruptly.*resumes from there"):
        bench.run_plan(plan, store, executor=executor, on_run=kill_a_worker)
    kept = _stored(tmp_path)  # every record there is whole JSON
    assert 0 < len(kept) < len(plan.specs())
    trained, execute = [], bench.execute
    monkeypatch.setattr(bench, "execute", lambda spec: trained.append(spec.key()) or execute(spec))
    bench.run_plan(plan, store)
    assert sorted(trained) == sorted(spec.key() for spec in plan.specs() if f"{spec.key()}.json" not in kept)
    assert all(store.load(spec) is not None for spec in plan.specs())


def test_a_parent_killed_mid_plan_resumes_with_nothing_redone(reference, tmp_path, monkeypatch):
    records, folder = reference
    plan = _plan()
    first = bench.BenchPlan(plan.name, plan.settings[:2], plan.seeds, plan.config, protocol=plan.protocol,
                            dataset=plan.dataset, sensitive=plan.sensitive)
    bench.run_plan(first, bench.RecordStore(tmp_path))  # what the parent finished before it was killed
    (tmp_path / ".half-written.json.1234.tmp").write_text('{"acc', encoding="utf-8")  # an interrupted write
    done = {spec.key() for spec in first.specs()}
    trained, execute = [], bench.execute
    monkeypatch.setattr(bench, "execute", lambda spec: trained.append(spec.key()) or execute(spec))
    reused = []
    got = bench.run_plan(plan, bench.RecordStore(tmp_path), on_run=lambda s, r, again: reused.append(again))
    assert sorted(trained) == sorted(spec.key() for spec in plan.specs() if spec.key() not in done)
    assert reused == [True] * len(done) + [False] * len(trained)  # the stored ones first
    assert [_numbers(r) for r in got] == [_numbers(r) for r in records]


#: A parent that starts two workers on calls that sleep, prints their process ids, and waits.
SLEEPING_PARENT = """
import functools, time
from groupmixnorm.experiments.executors import LocalWorkers
if __name__ == "__main__":
    executor = LocalWorkers(2)
    for _ in range(2):
        executor.submit(functools.partial(time.sleep, 120))
    while len(executor.pids) < 2:
        time.sleep(0.05)
    print(*executor.pids, flush=True)
    time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return True  # no /proc: a live process as far as kill() tells


def test_workers_of_a_parent_killed_with_sigkill_exit(tmp_path):
    import subprocess
    import sys
    import time

    script = tmp_path / "parent.py"
    script.write_text(SLEEPING_PARENT, encoding="utf-8")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(word) for word in parent.stdout.readline().split()]
    finally:
        parent.kill()
        parent.wait()
    assert len(pids) == 2
    deadline = time.monotonic() + 30  # they exit at once; the margin is for a loaded machine
    while any(map(_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(_alive, pids))


def test_run_tabular_runs_every_data_set_on_one_executor(tmp_path, monkeypatch):
    plans = tabular_plans(quick=True, datasets=["german", "compas"], methods=["erm"])
    calls = []

    class Counting(Sequential):
        def submit(self, call):
            calls.append(call.args[0].dataset)
            return super().submit(call)

    records = run_tabular(plans, tmp_path, executor=Counting())
    assert calls == ["german", "compas"] and list(records) == ["german", "compas"]
    assert len(list((tmp_path / "compas" / "records").glob("*.json"))) == 1


# ----------------------------------------------------------------------------------------- the search


BOUNDS = {"dp_gap_hard": 0.3}


def _search(data, executor=None):
    """A small search of three methods, two trials each: its result and its front without the seconds."""
    config = TrainConfig(epochs=2, iterations=5, batch_size=64, hidden=(8,), lr=0.01, select="ap")
    methods = {"erm": {}, "gapreg": {"fairness": "dp"}, "gmn": {"fairness": "dp"}}
    result = constraint.search(data, methods, BOUNDS, config=config, budget=2, executor=executor)
    return result, constraint.front_table(result.trials, BOUNDS, result.chosen).drop(columns="seconds")


def test_the_search_on_workers_finds_the_trials_and_choice_of_one_process(planted, workers):
    bounds = BOUNDS
    alone, alone_table = _search(planted)
    spread, spread_table = _search(planted, workers)
    assert list(alone_table["method"]) == ["erm", "gapreg", "gapreg", "gmn", "gmn"]  # method by method
    assert spread_table.equals(alone_table)
    assert alone.chosen is not None
    assert spread.chosen.row(bounds) | {"seconds": 0} == alone.chosen.row(bounds) | {"seconds": 0}
    scores = spread.scorer(planted.test), alone.scorer(planted.test)  # the model trained again here
    assert (scores[0] == scores[1]).all()


# ------------------------------------------------------------------------------ the executors themselves


def test_stream_asks_for_more_calls_after_each_result_and_stops_on_an_error():
    results, asked = [], []

    def ready(free):
        asked.append(free)
        return [(len(results), lambda n=len(results): n * n)] if len(results) < 3 else []

    for _, value in stream(Sequential(), ready):
        results.append(value)
    assert results == [0, 1, 4] and asked == [1, 1, 1, 1]
    closed = []

    class Watched(Sequential):
        def close(self, *, abort=False):
            closed.append(abort)

    with pytest.raises(ZeroDivisionError):
        list(stream_all(Watched(), [(0, lambda: 1), (1, lambda: 1 / 0), (2, lambda: 2)]))
    assert closed == [True]


def test_a_sequential_future_holds_the_error_of_its_call():
    future = Sequential().submit(lambda: 1 / 0)
    assert isinstance(future, Future) and isinstance(future.exception(), ZeroDivisionError)


@pytest.mark.parametrize(("cores", "expected"), [(1, 1), (2, 2), (3, 2), (64, 63)])
def test_default_workers_leave_a_core_for_the_parent_beyond_two(monkeypatch, cores, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert default_workers() == expected


def test_executor_for_the_command_line_flags():
    assert isinstance(executor_for(), Sequential) and isinstance(executor_for(1), Sequential)
    assert executor_for(3, threads=2).slots == 3 and executor_for(3, threads=2).threads == 2
    with pytest.raises(ValueError, match="not both"):
        executor_for(2, "auto")
    with pytest.raises(ValueError, match="at least 1"):
        LocalWorkers(0)


def test_flags_that_do_not_apply_are_one_line_errors(capsys, tmp_path):
    assert cli.main(["bench", "adult-debias", "--quick", "--workers", "2"]) == 2
    assert "--workers and --ray apply to the adult" in capsys.readouterr().err
    assert cli.main(["train", "--dataset", "german", "--workers", "2", "--out", str(tmp_path)]) == 2
    assert "--workers applies to a --max-gap search" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "tabular", "--quick", "--workers", "none"])
    assert "expected a number of workers of at least 1, or auto" in capsys.readouterr().err


def test_ray_missing_or_unreachable_is_one_line(monkeypatch, capsys, tmp_path):
    with monkeypatch.context() as patch:
        patch.setitem(__import__("sys").modules, "ray", None)  # as if the extra were not installed
        assert cli.main(["bench", "tabular", "--quick", "--ray", "auto", "--results-dir", str(tmp_path)]) == 2
        assert 'pip install "groupmixnorm[distributed]"' in capsys.readouterr().err
    _require_ray()
    monkeypatch.setattr("groupmixnorm.experiments.executors.PROBE_SECONDS", 1.0)
    assert cli.main(["bench", "tabular", "--quick", "--ray", "127.0.0.1:1", "--results-dir", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "no Ray cluster answers at 127.0.0.1:1" in error
