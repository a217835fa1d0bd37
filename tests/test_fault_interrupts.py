"""Interrupted benches: SIGKILL at any moment, start again, and the grid completes without redoing finished
runs and without a corrupt or half-written record."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from groupmixnorm.experiments.bench import RecordStore, adult_plan

METHODS = "erm,gapreg,gmn"


def _bench(tmp_path: Path) -> list[str]:
    return [sys.executable, "-m", "groupmixnorm", "bench", "adult", "--quick", "--methods", METHODS, "--quiet",
            "--records-dir", str(tmp_path / "records"), "--results-dir", str(tmp_path / "results")]


def _records(tmp_path: Path) -> dict[str, int]:
    """Record files (the only visible ``*.json`` files) and their modification times."""
    return {p.name: p.stat().st_mtime_ns for p in (tmp_path / "records").glob("*.json")}


def _start(tmp_path: Path) -> subprocess.Popen:
    return subprocess.Popen(_bench(tmp_path), env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_when(process: subprocess.Popen, ready, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not ready() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()


@pytest.mark.slow
def test_a_killed_bench_resumes_to_a_complete_grid(tmp_path: Path) -> None:
    # 1. Killed as soon as its first record is on disk (in the middle of the next run).
    _kill_when(_start(tmp_path), lambda: len(_records(tmp_path)) >= 1)
    first = _records(tmp_path)
    assert len(first) >= 1
    # 2. Killed again at an early, arbitrary moment: 1.5 s after start (while importing or training).
    process = _start(tmp_path)
    time.sleep(1.5)
    _kill_when(process, lambda: True)
    # 3. Runs to the end.
    finished = subprocess.run(_bench(tmp_path), env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                              text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]

    records = _records(tmp_path)
    assert all(records[name] == mtime for name, mtime in first.items()), "a finished run was trained again"
    plan = adult_plan(quick=True)
    expected = [spec for spec in plan.specs() if spec.method in METHODS.split(",")]
    store = RecordStore(tmp_path / "records")
    assert sorted(records) == sorted(store.path(spec).name for spec in expected)
    for spec in expected:
        record = json.loads(store.path(spec).read_text())  # every record parses and belongs to its spec
        assert store.load(spec) is not None and record["method"] == spec.method
    # A write cut short leaves at most a hidden temporary file, never a record.
    assert all(p.name.startswith(".") for p in (tmp_path / "records").iterdir() if p.suffix != ".json")
    rows = (tmp_path / "results" / "adult" / "runs.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + len(expected)
    assert (tmp_path / "results" / "adult.md").read_text().startswith("# Bench: adult")


def test_a_damaged_record_is_recomputed_not_trusted(tmp_path: Path) -> None:
    store = RecordStore(tmp_path)
    spec = adult_plan(quick=True).specs()[0]
    store.path(spec).parent.mkdir(parents=True, exist_ok=True)
    store.path(spec).write_text('{"spec": {"method": "erm"')  # half a file, as a non-atomic writer might leave
    assert store.load(spec) is None
    store.path(spec).write_text(json.dumps({"spec": {"method": "other"}}))  # someone else's record
    assert store.load(spec) is None
