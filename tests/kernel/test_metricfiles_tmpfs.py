"""The metrics files on a full tmpfs: no SIGBUS, ever; metrics off when they cannot be made."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest

from macvtapdp import metricfiles
from macvtapdp.config import Resource
from macvtapdp.plugin.metrics import observer
from macvtapdp.plugin.observe import Quiet
from macvtapdp.settings import Plugin, Serve

pytestmark = pytest.mark.kernel

# claims its files, says so, waits; then stores into every page of them (a file growing
# within its size, as the library's does) and writes every series
WRITER = r"""
import mmap, os, sys
from macvtapdp.config import Resource
from macvtapdp.plugin.metrics import Metrics, observer
from macvtapdp.settings import Plugin, Serve

obs = observer(Serve(resource=Resource(name="a", lower="al"), plugin=Plugin(run_dir=sys.argv[1])))
assert isinstance(obs, Metrics)
print("claimed", flush=True)
sys.stdin.readline()
for fd in obs._fds:
    size = os.fstat(fd).st_size
    with mmap.mmap(fd, size) as m:
        used = int.from_bytes(m[:4], "little")
        for page in range(size // mmap.PAGESIZE):
            at = max(used, page * mmap.PAGESIZE)  # never over a value
            if at < (page + 1) * mmap.PAGESIZE:
                m[at] = 0
for n in range(1000):
    obs.allocated("created", n / 1e5)
    obs.allocated("reused", n / 1e5)
    obs.allocated("failed", 0.0, 2)
    obs.health(n % 2 == 0, 100, n % 2 == 0)
    obs.registered()
    obs.swept()
print("wrote", flush=True)
"""


@pytest.fixture
def small_run_dir() -> Iterator[str]:
    """A run directory on a tmpfs of 256 KiB, with its metrics directory."""
    path = tempfile.mkdtemp(prefix="mdp-tmpfs-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", path], check=True)
    try:
        os.mkdir(os.path.join(path, "metrics"), 0o700)
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=True)
        os.rmdir(path)


def fill(directory: str, leave: int = 0) -> None:
    """Fill the tmpfs, then free ``leave`` bytes again."""
    fd = os.open(os.path.join(directory, "filler"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while os.write(fd, bytes(4096)):
                pass
        os.ftruncate(fd, max(0, os.fstat(fd).st_size - leave))
    finally:
        os.close(fd)


# nothing free; room for the first file, not for the second
@pytest.mark.parametrize("leave", [0, metricfiles.FILE_SIZE + 4096])
def test_on_a_full_tmpfs_metrics_are_off_with_one_line_and_nothing_is_left(
    small_run_dir: str, caplog: pytest.LogCaptureFixture, leave: int
) -> None:
    fill(small_run_dir, leave)
    metrics_dir = os.path.join(small_run_dir, "metrics")
    with pytest.raises(OSError) as raised:
        metricfiles.claim(metrics_dir)
    assert raised.value.errno == 28  # ENOSPC
    assert os.listdir(metrics_dir) == []
    settings = Serve(resource=Resource(name="a", lower="al"), plugin=Plugin(run_dir=small_run_dir))
    with caplog.at_level(logging.INFO):
        assert isinstance(observer(settings), Quiet)
    assert [r.getMessage() for r in caplog.records] == [
        f"metrics off for this process: cannot make its metrics files in {metrics_dir}: "
        "No space left on device"
    ]
    assert os.listdir(metrics_dir) == []


def test_files_claimed_before_the_tmpfs_filled_take_every_write(small_run_dir: str) -> None:
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, small_run_dir],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert writer.stdout is not None and writer.stdin is not None
    try:
        assert writer.stdout.readline() == "claimed\n"
        fill(small_run_dir)
        writer.stdin.write("go\n")
        writer.stdin.flush()
        assert writer.stdout.readline() == "wrote\n"
        assert writer.wait(30) == 0  # not -SIGBUS
    finally:
        with contextlib.suppress(ProcessLookupError):
            writer.kill()
        writer.communicate()
    found = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for m in metricfiles.collect(os.path.join(small_run_dir, "metrics"))
        for s in m.samples
    }
    assert found[("macvtapdp_allocations_total", (("resource", "a"), ("result", "failed")))] == 2000
    assert found[("macvtapdp_registrations_total", (("resource", "a"),))] == 1000
