"""``python -m macvtapdp.node.metrics``: the node's one HTTP endpoint.

supervisord runs it as the ``metrics`` program when ``--metrics-address`` is
not empty, with the node's settings on its command line. It serves:

- ``/metrics``: the Prometheus text format (OpenMetrics if asked for), the sum
  of every resource process's files in ``Layout.metrics_dir`` (living and
  dead: ``macvtapdp.metricfiles``, swept at every scrape and every
  ``SWEEP_EVERY`` seconds) and the watchdog's restart counts;
- ``/healthz``: 200 while supervisord answers (what ``status --alive`` asks),
  else 503;
- ``/readyz``: 200 while every resource serves, as ``status`` decides it (its
  process RUNNING and its socket answering GetDevicePluginOptions), else 503.

It never imports the resource processes' code and they never wait for it: a
stuck or dead endpoint costs the node its metrics and nothing else.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from http import HTTPStatus

from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from macvtapdp import metricfiles, settings
from macvtapdp.errors import MacvtapdpError, PermanentError
from macvtapdp.node import restarts
from macvtapdp.node.httpd import Request, Response, Server, Shared, serve_forever
from macvtapdp.rundir import Layout

log = logging.getLogger("macvtapdp")

HEALTH_TIMEOUT = 1.0  # supervisord must answer /healthz and /readyz within this
SWEEP_EVERY = 30.0


class _Families(Collector):
    """What prometheus_client's encoders take: a collector (of what was collected)."""

    def __init__(self, metrics: Sequence[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> Sequence[Metric]:
        return self._metrics


class Endpoint:
    """The three answers, computed in threads (files, XML-RPC and gRPC all block)."""

    def __init__(self, layout: Layout, pool: concurrent.futures.Executor) -> None:
        self.layout = layout
        self._files = threading.Lock()  # sweeps and reads of the metrics files
        self._sweep_failing = False
        self.families = Shared(self.collect, pool)
        self.swept = Shared(self.sweep, pool)
        self.alive = Shared(self.check_alive, pool)
        self.ready = Shared(self.check_ready, pool)

    # -- /metrics

    def sweep(self) -> None:
        with self._files:
            self._sweep()

    def _sweep(self) -> None:
        directory = self.layout.metrics_dir
        try:
            done = metricfiles.sweep(directory)
        except Exception as err:  # a full disk, a foreign file: the scrape goes on without
            if not self._sweep_failing:
                log.warning("cannot sweep the metrics files in %s: %s", directory, err)
            self._sweep_failing = True
            return
        if self._sweep_failing:
            log.info("metrics files in %s swept again", directory)
        self._sweep_failing = False
        if done.gauges or done.folded:
            log.info(
                "metrics of dead processes: %d gauge files removed, %d files of counts folded",
                done.gauges,
                done.folded,
            )

    def collect(self) -> list[Metric]:
        with self._files:
            self._sweep()
            try:
                found = metricfiles.collect(self.layout.metrics_dir)
            except OSError as err:  # no metrics directory: run by hand, not by `run`
                log.warning("cannot read the metrics files: %s", err)
                found = []
        counts, _serial = restarts.read(self.layout.restarts_file)
        family = CounterMetricFamily(
            "macvtapdp_program_restarts",
            "Restarts of each program by supervisord (an exit, a failed start, a FATAL one "
            "started again by the watchdog).",
            labels=["program"],
        )
        for program, count in sorted(counts.items()):
            family.add_metric([program], count)
        return [*found, family]

    async def metrics(self, request: Request) -> Response:
        families = await self.families()
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(HTTPStatus.OK, encoder(_Families(families)), content_type)

    # -- /healthz and /readyz

    def _supervisor_state(self) -> str:
        from macvtapdp.node.control import Supervisor

        with Supervisor(self.layout.server_url, timeout=HEALTH_TIMEOUT) as supervisor:
            state = supervisor.call("getState")
        return str(state.get("statename", "?")) if isinstance(state, dict) else "?"

    def check_alive(self) -> tuple[bool, str]:
        try:
            state = self._supervisor_state()
        except MacvtapdpError as err:
            return False, f"supervisord does not answer: {err}"
        return state == "RUNNING", f"supervisord is {state}"

    def check_ready(self) -> tuple[bool, str]:
        from macvtapdp.node import status
        from macvtapdp.node.control import Supervisor

        try:
            with Supervisor(self.layout.server_url, timeout=HEALTH_TIMEOUT) as supervisor:
                infos = supervisor.processes()
        except MacvtapdpError as err:
            return False, f"supervisord does not answer: {err}"
        rows = [r for r in status.rows(infos, self.layout) if r.resource is not None]
        lines = [
            f"{r.resource}: "
            + ("serving" if r.ok else f"not serving (process {r.process.lower()})")
            for r in sorted(rows, key=lambda r: r.program)
        ]
        ok = all(r.ok for r in rows)
        count = f"{len(rows)} resource" + ("" if len(rows) == 1 else "s")
        return ok, "\n".join([count, *lines])

    async def healthz(self, request: Request) -> Response:
        return _verdict(*await self.alive())

    async def readyz(self, request: Request) -> Response:
        return _verdict(*await self.ready())


def _verdict(ok: bool, text: str) -> Response:
    status = HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE
    return Response.text(status, ("ok" if ok else "not ok") + f": {text}\n")


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (checked by ``settings.check_address``); ``[::]:PORT`` for IPv6."""
    host, _, port = address.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)


async def _serve(endpoint: Endpoint, address: str) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    server = Server(
        {"/metrics": endpoint.metrics, "/healthz": endpoint.healthz, "/readyz": endpoint.readyz}
    )

    async def sweeping() -> None:
        while not stop.is_set():
            await endpoint.swept()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SWEEP_EVERY)

    host, port = split_address(address)
    sweeper = asyncio.create_task(sweeping())
    try:
        await serve_forever(
            server,
            host,
            port,
            stop,
            lambda: log.info("serving /metrics, /healthz, /readyz on %s", address),
        )
    except OSError as err:
        log.error("cannot listen on %s: %s", address, err.strerror or err)
        return 1
    finally:
        sweeper.cancel()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``metrics`` program under supervisord."""
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # /readyz probes with grpc
    from macvtapdp import logs
    from macvtapdp.linux import process

    try:
        node = settings.from_argv(settings.Node, sys.argv[1:] if argv is None else argv)
        address = settings.check_address(node.metrics_address)
        if not address:
            raise PermanentError(f"{settings.METRICS_ADDRESS.flag} is empty: nothing to serve")
    except PermanentError as err:
        print(f"macvtapdp: error: {err}", file=sys.stderr)
        return 2
    logs.configure("metrics")
    process.die_with_parent()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="endpoint")
    try:
        return asyncio.run(_serve(Endpoint(Layout(node.plugin.run_dir), pool), address))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        logs.flush()


if __name__ == "__main__":
    sys.exit(main())
