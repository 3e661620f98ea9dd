"""The multiprocess files: claimed before prometheus_client maps them, swept by lock, folded.

Writers are real processes (``python -c``) running the resource process's own
``plugin.metrics.observer``: prometheus_client chooses its multiprocess mode
when it is imported, so it cannot be the test process. The sums are read
with ``metricfiles.collect``, as the endpoint reads them.
"""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from macvtapdp import metricfiles

WRITER = r"""
import json, os, sys
from macvtapdp.config import Resource
from macvtapdp.plugin.metrics import observer
from macvtapdp.plugin.observe import Quiet
from macvtapdp.settings import Plugin, Serve
from macvtapdp import metricfiles

run_dir, name, lower, created, stay = sys.argv[1:]
resource = Resource(name=name, lower=lower, capacity=4)
obs = observer(Serve(resource=resource, plugin=Plugin(run_dir=run_dir)))
if isinstance(obs, Quiet):
    print("quiet", flush=True)
    sys.exit(0)
obs.health(True, 4, True)
obs.registered()
for _ in range(int(created)):
    obs.allocated("created", 0.0015)
obs.allocated("reused", 0.0003)
obs.allocated("failed", 0.0, 2)
obs.swept(3)
directory = os.path.join(run_dir, "metrics")
files = {}
for kind in metricfiles.WRITER_KINDS:
    path = os.path.join(directory, f"{kind}_{os.getpid()}.db")
    st = os.stat(path)
    with open(path, "rb") as fh:
        used = int.from_bytes(fh.read(4), "little")
    files[kind] = {"size": st.st_size, "allocated": st.st_blocks * 512, "used": used}
print(json.dumps({"pid": os.getpid(), "files": files}), flush=True)
if stay == "stay":
    sys.stdin.read()
"""


class Writer:
    """A resource process's metrics, alive until ``stop``ped (or dead at once)."""

    def __init__(
        self, run_dir: Path, name: str, created: int = 1, stay: bool = True, lower: str = ""
    ) -> None:
        argv = [sys.executable, "-c", WRITER, str(run_dir), name, lower or f"{name}l",
                str(created), "stay" if stay else "exit"]  # fmt: skip
        if not stay:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True)
            self.popen = None
            self.line = done.stdout.strip()
            return
        self.popen = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.popen.stdout is not None
        self.line = self.popen.stdout.readline().strip()

    def report(self) -> dict[str, dict[str, int]]:
        import json

        files: dict[str, dict[str, int]] = json.loads(self.line)["files"]
        return files

    def stop(self) -> None:
        assert self.popen is not None and self.popen.stdin is not None
        self.popen.stdin.close()
        assert self.popen.wait(30) == 0
        assert self.popen.stdout is not None
        self.popen.stdout.close()


@pytest.fixture
def run_dir(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "metrics").mkdir()
    yield tmp_path


def sums(directory: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample the endpoint would serve: (name, labels) -> value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for m in metricfiles.collect(str(directory))
        for s in m.samples
    }


GAUGES = {"macvtapdp_devices", "macvtapdp_lower_link_up"}


def counts(directory: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The counters and histograms of ``sums``: what must survive a process's death."""
    return {k: v for k, v in sums(directory).items() if k[0] not in GAUGES}


def value(
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return found[(name, tuple(sorted(labels.items())))]


def test_the_files_are_allocated_whole_and_the_longest_names_fit_without_growing(
    run_dir: Path,
) -> None:
    name = "r" * 63  # the longest resource name Kubernetes takes, the longest link name
    writer = Writer(run_dir, name, created=3, stay=False, lower="l" * 15)
    for kind, file in writer.report().items():
        assert file["size"] == metricfiles.FILE_SIZE, kind  # not grown by prometheus_client
        assert file["allocated"] >= metricfiles.FILE_SIZE, kind  # no hole to fault on
        assert 3 * file["used"] < metricfiles.FILE_SIZE, kind  # room to spare
    found = sums(run_dir / "metrics")
    assert value(found, "macvtapdp_allocations_total", resource=name, result="created") == 3
    assert value(found, "macvtapdp_allocations_total", resource=name, result="failed") == 2
    count = value(found, "macvtapdp_allocate_duration_seconds_count", resource=name)
    assert count == 4  # created and reused devices, not the failed ones
    under_2ms = (
        "macvtapdp_allocate_duration_seconds_bucket",
        (("le", "0.002"), ("resource", name)),
    )
    assert found[under_2ms] == 4
    assert value(found, "macvtapdp_swept_macvtaps_total", resource=name) == 3


def test_a_dead_writers_gauges_go_and_its_counts_are_folded_once(run_dir: Path) -> None:
    directory = run_dir / "metrics"
    alive = Writer(run_dir, "a", created=2)
    try:
        Writer(run_dir, "b", created=5, stay=False)
        before = sums(directory)
        assert value(before, "macvtapdp_devices", resource="b", health="healthy") == 4
        done = metricfiles.sweep(str(directory))
        assert (done.gauges, done.folded) == (1, 2)  # b's gauges; b's counter and histogram
        after = sums(directory)
        gone = {k: v for k, v in before.items() if k not in after}
        assert {k[0] for k in gone} == GAUGES
        assert all(dict(k[1])["resource"] == "b" for k in gone)
        assert {k: after[k] for k in before if k in after} == {
            k: v for k, v in before.items() if k in after
        }
        assert value(after, "macvtapdp_allocations_total", resource="b", result="created") == 5
        assert value(after, "macvtapdp_devices", resource="a", health="healthy") == 4
        pid = alive.line.split('"pid": ')[1].split(",")[0]
        assert sorted(os.listdir(directory)) == sorted(
            [f"counter_{pid}.db", f"histogram_{pid}.db", f"gauge_livesum_{pid}.db",
             "counter_archive.1.db", "histogram_archive.1.db"]
        )  # fmt: skip
        assert metricfiles.sweep(str(directory)) == metricfiles.Swept()  # the living stay
    finally:
        alive.stop()


def test_a_crash_loop_keeps_every_count_in_one_archive_per_kind(run_dir: Path) -> None:
    directory = run_dir / "metrics"
    for n in range(1, 5):
        Writer(run_dir, "a", created=n, stay=False)  # the same resource, restarted each time
        metricfiles.sweep(str(directory))
        found = sums(directory)
        assert value(found, "macvtapdp_allocations_total", resource="a", result="created") == sum(
            range(1, n + 1)
        )
        assert value(found, "macvtapdp_registrations_total", resource="a") == n
        assert (
            value(found, "macvtapdp_allocate_duration_seconds_count", resource="a")
            == sum(range(1, n + 1)) + n
        )
    assert sorted(os.listdir(directory)) == ["counter_archive.4.db", "histogram_archive.4.db"]
    assert not any(
        m.name == "macvtapdp_devices" and m.samples for m in metricfiles.collect(str(directory))
    )


def test_a_fold_cut_short_anywhere_counts_each_value_once(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = run_dir / "metrics"
    Writer(run_dir, "a", created=2, stay=False)
    metricfiles.sweep(str(directory))  # archive 1
    Writer(run_dir, "a", created=3, stay=False)
    expected = counts(directory)

    def crash(*args: object) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:  # renamed to .dead, the archive not written
        m.setattr(metricfiles, "_write_archive", crash)
        with pytest.raises(OSError):
            metricfiles.sweep(str(directory))
    assert any(name.endswith(".2.dead") for name in os.listdir(directory))
    assert counts(directory) == expected
    with monkeypatch.context() as m:  # archive 2 committed, nothing cleaned
        m.setattr(metricfiles, "_clean", lambda *args: None)
        metricfiles.sweep(str(directory))
    assert {"counter_archive.1.db", "counter_archive.2.db"} <= set(os.listdir(directory))
    assert any(name.endswith(".2.dead") for name in os.listdir(directory))
    assert counts(directory) == expected
    metricfiles.sweep(str(directory))
    assert sorted(os.listdir(directory)) == ["counter_archive.2.db", "histogram_archive.2.db"]
    assert counts(directory) == expected


def test_a_pid_that_dies_twice_before_a_fold_keeps_both_counts(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = run_dir / "metrics"

    def crash(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(metricfiles, "_write_archive", crash)
    for created in (2, 3):
        writer = Writer(run_dir, "a", created=created, stay=False)
        pid = writer.line.split('"pid": ')[1].split(",")[0]
        for kind in metricfiles.WRITER_KINDS:  # as if both had had pid 4242
            os.rename(directory / f"{kind}_{pid}.db", directory / f"{kind}_4242.db")
        with pytest.raises(OSError):
            metricfiles.sweep(str(directory))
    assert (
        value(counts(directory), "macvtapdp_allocations_total", resource="a", result="created") == 5
    )
    monkeypatch.undo()
    metricfiles.sweep(str(directory))
    assert (
        value(counts(directory), "macvtapdp_allocations_total", resource="a", result="created") == 5
    )
    assert value(counts(directory), "macvtapdp_registrations_total", resource="a") == 2


def test_a_file_left_by_a_dead_process_with_our_pid_is_taken_over(run_dir: Path) -> None:
    """pids are reused: its gauges are not ours to report, its counts stay counted."""
    directory = run_dir / "metrics"
    pid = os.getpid()
    stale_gauge = directory / f"gauge_livesum_{pid}.db"
    stale_counter = directory / f"counter_{pid}.db"
    stale_gauge.write_bytes(b"stale")
    stale_counter.write_bytes(b"\x08" + bytes(100))  # sparse-ish and short
    counter_inode = stale_counter.stat().st_ino
    fds = metricfiles.claim(str(directory), ("counter", "gauge_livesum"))
    try:
        assert stale_counter.stat().st_ino == counter_inode
        assert stale_counter.stat().st_size == metricfiles.FILE_SIZE
        assert stale_gauge.read_bytes() == bytes(metricfiles.FILE_SIZE)  # a fresh, empty file
        for path in (stale_counter, stale_gauge):  # locked: a sweep sees them alive
            with open(path, "rb") as fh, pytest.raises(BlockingIOError):
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert sorted(os.listdir(directory)) == [f"counter_{pid}.db", f"gauge_livesum_{pid}.db"]
    finally:
        for fd in fds:
            os.close(fd)


def test_a_file_that_cannot_be_read_is_left_out_with_a_line(
    run_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = run_dir / "metrics"
    Writer(run_dir, "a", created=2, stay=False)
    (directory / "counter_999999999.db").write_bytes((4000).to_bytes(4, "little") + bytes(60))
    with caplog.at_level(logging.WARNING):
        found = sums(directory)
    assert value(found, "macvtapdp_allocations_total", resource="a", result="created") == 2
    assert "counter_999999999.db" in caplog.text
    with caplog.at_level(logging.WARNING):
        metricfiles.sweep(str(directory))  # it is folded away: its counts are lost, said once
    assert "cannot be read" in caplog.text
    assert (
        value(sums(directory), "macvtapdp_allocations_total", resource="a", result="created") == 2
    )


def test_unknown_files_are_neither_counted_nor_touched(run_dir: Path) -> None:
    directory = run_dir / "metrics"
    for name in ("restarts.json", "notes.txt", "counter_x.db", "counter_12.3.dead.bak"):
        (directory / name).write_text("{}")
    assert metricfiles.counted(str(directory)) == []
    metricfiles.sweep(str(directory))
    assert len(os.listdir(directory)) == 4


def test_a_living_writers_file_in_the_making_is_not_removed(run_dir: Path) -> None:
    directory = run_dir / "metrics"
    making = directory / "counter_12345.db.new"
    with open(making, "wb") as fh:
        metricfiles.sweep(str(directory))  # fresh: being made right now
        assert making.exists()
        old = time.time() - 2 * metricfiles.STALE_NEW
        os.utime(making, (old, old))
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)  # old, but its maker is alive
        metricfiles.sweep(str(directory))
        assert making.exists()
    metricfiles.sweep(str(directory))  # its maker died: a leftover
    assert not making.exists()
