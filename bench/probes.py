"""What the exec probes cost per call: CPU time and peak RSS.

The DaemonSet probes over HTTP (the metrics endpoint's ``/healthz`` and
``/readyz``); these exec probes are its alternative for a node with metrics off.

Starts the real ``macvtapdp run`` (3 resources on veth lower links, the kubelet
stand-in; ``bench.rig``), then runs each probe command as the kubelet's exec
probe would, one call after another, and reads each call's CPU time
(user + system) and peak RSS from ``wait4``. Targets (DESIGN.md, issue 11):
liveness (``macvtapdp status --alive``) <= 60 ms CPU and <= 25 MiB peak RSS,
readiness (``macvtapdp status``) <= 150 ms CPU.

Run as root from the install whose figures you want (an editable install adds
its import finder, ~10 ms, to every call; the image has a regular one)::

    .venv/bin/python -m bench.probes [--calls 30] [--resources 3]  # in the checkout
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from bench.rig import BenchError, Rig, median, percentile
from harness.processes import all_healthy, macvtapdp

# The manifest's periods (seconds), to turn a call's CPU into millicores.
LIVENESS_PERIOD = 30
READINESS_PERIOD = 10
TARGETS = {"liveness": (60.0, 25.0), "readiness": (150.0, None)}


@dataclass(frozen=True)
class Call:
    cpu_ms: float
    rss_mib: float
    wall_ms: float


# Peak RSS survives exec (the kernel keeps the old address space's high-water mark), so a
# probe started straight from this process, large with grpc and the stand-in, would report
# this process's RSS. A small interpreter without site starts it instead, and reports.
SPAWNER = """
import json, os, sys, time
t = time.monotonic()
pid = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ)
_, status, ru = os.wait4(pid, 0)
print(json.dumps([os.waitstatus_to_exitcode(status), ru.ru_utime + ru.ru_stime,
                  ru.ru_maxrss, time.monotonic() - t]))
"""


def one_call(argv: Sequence[str]) -> Call:
    """Run ``argv`` to its end; its own CPU time and peak RSS (``wait4``), and wall time."""
    done = subprocess.run(
        [sys.executable, "-S", "-c", SPAWNER, *argv], capture_output=True, text=True, check=False
    )
    try:
        code, cpu, maxrss, wall = json.loads(done.stdout.splitlines()[-1])
    except (IndexError, ValueError):
        raise BenchError(f"{' '.join(argv)}: no measurement: {done.stderr.strip()}") from None
    if code != 0:
        raise BenchError(f"{' '.join(argv)}: exit {code}: {done.stderr.strip()}")
    return Call(cpu * 1000, maxrss / 1024, wall * 1000)


def floor() -> Call:
    """The spawner's own peak RSS: no probe can be measured below it."""
    return one_call([sys.executable, "-S", "-c", "pass"])


def editable() -> bool:
    """Whether the probed install of macvtapdp is editable (its finder runs at every start)."""
    where = subprocess.run(
        [sys.executable, "-c", "import macvtapdp; print(macvtapdp.__file__)"],
        capture_output=True, text=True, cwd="/", check=False,
    ).stdout  # fmt: skip
    return "-packages" not in where


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--calls", type=int, default=30, help="calls per probe, default 30")
    p.add_argument("--resources", type=int, default=3, help="resources, default 3")
    p.add_argument("--json", default=None, help="also write every sample here")
    args = p.parse_args(argv)
    if args.calls < 1 or not 1 <= args.resources <= 64:
        p.error("need calls >= 1 and 1 <= resources <= 64")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("probes: run as root (network namespaces, supervisord)", file=sys.stderr)
        return 2
    samples: dict[str, list[Call]] = {"liveness": [], "readiness": []}
    try:
        with Rig(args.resources, 10) as rig:
            rig.kubelet.start()
            rig.start_node()
            with rig.log_on_failure():
                rig.wait_all(all_healthy(10), "registered and Healthy", 30.0)
                run_dir = f"--run-dir={rig.node.run_dir}"
                probes = {
                    "liveness": [*macvtapdp(), "status", "--alive", run_dir],
                    "readiness": [*macvtapdp(), "status", run_dir],
                }
                for name, command in probes.items():
                    one_call(command)  # warm the page cache
                    for _ in range(args.calls):
                        samples[name].append(one_call(command))
    except BenchError as err:
        print(f"probes: failed: {err}", file=sys.stderr)
        return 1
    base = floor()
    print(render(samples, args.resources, editable()))
    print(f"floor (the spawner, python -S): {base.cpu_ms:.1f} ms CPU, {base.rss_mib:.1f} MiB")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({k: [c.__dict__ for c in v] for k, v in samples.items()}, fh, indent=1)
    return 0


def render(samples: dict[str, list[Call]], resources: int, is_editable: bool) -> str:
    periods = {"liveness": LIVENESS_PERIOD, "readiness": READINESS_PERIOD}
    head = "probe      | CPU ms p50 / max | target | peak RSS MiB p50 / max | target | wall ms p50"
    lines = [head, "-" * len(head)]
    for name, calls in samples.items():
        cpu = [c.cpu_ms for c in calls]
        rss = [c.rss_mib for c in calls]
        wall = [c.wall_ms for c in calls]
        cpu_target, rss_target = TARGETS[name]
        lines.append(
            f"{name:<10} | {median(cpu):6.1f} / {max(cpu):6.1f}  | <= {cpu_target:<3.0f} | "
            f"{median(rss):6.1f} / {max(rss):6.1f}        | "
            f"{'<= ' + format(rss_target, '.0f') if rss_target else '-':<6} | "
            f"{median(wall):6.1f}"
        )
    load = sum(median(c.cpu_ms for c in samples[n]) / periods[n] for n in samples)
    lines.append(
        f"\n{resources} resources; {len(samples['liveness'])} calls each; p90 CPU: "
        + ", ".join(
            f"{n} {percentile([c.cpu_ms for c in v], 90):.1f} ms" for n, v in samples.items()
        )
        + f"; at the manifest's periods ({LIVENESS_PERIOD} s, {READINESS_PERIOD} s) the probes"
        f" cost {load:.1f} millicores"
        + ("; editable install (its finder adds ~10 ms a call)" if is_editable else "")
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
