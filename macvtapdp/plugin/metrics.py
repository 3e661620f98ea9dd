"""A resource process's series, written where the node's endpoint reads them.

prometheus_client's multiprocess mode: every value lives in this process's
mmap'ed files in ``Layout.metrics_dir``; the ``metrics`` program sums the files
of all processes when scraped, so a crashed process's counts stay counted
once and its gauges go with it (``macvtapdp.metricfiles``). The files are
claimed (allocated and locked) before prometheus_client maps them; when that
fails (a full tmpfs) this process serves without metrics and says so once:
serving never depends on metrics.

Every series is created at start, label values included, so the files never
grow afterwards and a scrape shows zeros rather than nothing.
"""

from __future__ import annotations

import logging
import os

from macvtapdp import metricfiles
from macvtapdp.config import Resource
from macvtapdp.plugin.observe import Observer, Quiet
from macvtapdp.rundir import Layout
from macvtapdp.settings import Serve

log = logging.getLogger("macvtapdp")

RESULTS = ("created", "reused", "failed")
# Allocate makes or finds a macvtap in about a millisecond; the tail is what matters
BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """The Observer that keeps ``resource``'s series (``fds``: the claimed files, kept open)."""

    def __init__(self, resource: Resource, fds: list[int]) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self._fds = fds  # their locks say this process is alive
        name = resource.name
        devices = Gauge(
            "macvtapdp_devices",
            "Devices of the resource by health, as every ListAndWatch stream reports them.",
            ["resource", "health"],
            multiprocess_mode="livesum",
            registry=None,
        )
        self._healthy = devices.labels(name, "healthy")
        self._unhealthy = devices.labels(name, "unhealthy")
        self._link_up = Gauge(
            "macvtapdp_lower_link_up",
            "1 while the resource's lower link exists and is up (admin up, carrier), else 0.",
            ["resource", "link"],
            multiprocess_mode="livesum",
            registry=None,
        ).labels(name, resource.lower)
        allocations = Counter(
            "macvtapdp_allocations",
            "Devices asked of Allocate: created (a new macvtap), reused (its macvtap was "
            "there), failed (refused or not made).",
            ["resource", "result"],
            registry=None,
        )
        self._allocations = {r: allocations.labels(name, r) for r in RESULTS}
        self._duration = Histogram(
            "macvtapdp_allocate_duration_seconds",
            "Time Allocate took to make or find one device's macvtap (devices allocated).",
            ["resource"],
            buckets=BUCKETS,
            registry=None,
        ).labels(name)
        self._registrations = Counter(
            "macvtapdp_registrations",
            "Successful registrations with the kubelet (one at start, one per kubelet restart).",
            ["resource"],
            registry=None,
        ).labels(name)
        self._swept = Counter(
            "macvtapdp_swept_macvtaps",
            "Leaked macvtaps deleted by the sweep (no pod held their device for the grace).",
            ["resource"],
            registry=None,
        ).labels(name)

    def allocated(self, result: str, seconds: float, count: int = 1) -> None:
        counter = self._allocations.get(result)
        if counter is None:
            return
        counter.inc(count)
        if result != "failed":
            for _ in range(count):
                self._duration.observe(seconds)

    def registered(self) -> None:
        self._registrations.inc()

    def health(self, healthy: bool, capacity: int, lower_up: bool) -> None:
        self._healthy.set(capacity if healthy else 0)
        self._unhealthy.set(0 if healthy else capacity)
        self._link_up.set(1 if lower_up else 0)

    def swept(self, count: int = 1) -> None:
        self._swept.inc(count)


def observer(settings: Serve) -> Observer:
    """The metrics of ``settings.resource``, or Quiet (one log line) when its files cannot be made.

    Call it before anything imports prometheus_client: the library picks its
    multiprocess mode at import, from the environment.
    """
    directory = Layout(settings.plugin.run_dir).metrics_dir
    try:
        fds = metricfiles.claim(directory)
    except OSError as err:
        log.warning(
            "metrics off for this process: cannot make its metrics files in %s: %s",
            directory,
            err.strerror or err,
        )
        return Quiet()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    try:
        return Metrics(settings.resource, fds)
    except OSError as err:  # the library could not open or map what we made
        log.warning("metrics off for this process: %s", err)
        for fd in fds:
            os.close(fd)
        return Quiet()
