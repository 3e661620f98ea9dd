"""How the DaemonSet container's memory grows with the number of resources.

Starts the real ``macvtapdp run`` with N resources (veth lower links, 100
devices each, the kubelet stand-in; ``bench.rig``), allocates a few devices of
each, and sums the proportional set size (PSS, from ``/proc/<pid>/smaps_rollup``)
of supervisord and all its programs: each shared page counted once over the
tree, which is what the container's memory cgroup is charged for its
processes. The fit over N gives the fixed part and the part per resource; a
readiness probe (``macvtapdp status``) adds its own peak while it runs
(bench/probes.py).

    .venv/bin/python -m bench.memory [--sizes 1,4,16]  # in the checkout
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from bench.rig import BenchError, Rig
from harness.processes import all_healthy

CAPACITY = 100
ALLOCATED = 4  # devices allocated per resource before measuring


def tree(rig: Rig) -> tuple[float, float, float]:
    """(PSS of the whole tree, RSS of the largest resource process, its USS), MiB."""
    mem = rig.memory()
    serves = [m for m in mem if m.name.startswith("resource-")]
    largest = max(serves, key=lambda m: m.rss)
    return sum(m.pss for m in mem), largest.rss, largest.uss


def measure(resources: int) -> tuple[float, float, float]:
    with Rig(resources, CAPACITY) as rig, rig.log_on_failure():
        rig.kubelet.start()
        rig.start_node()
        rig.wait_all(all_healthy(CAPACITY), "registered and Healthy", 60.0)
        for name in rig.names:
            for i in range(ALLOCATED):
                rig.kubelet.allocate(rig.resource(name), [f"{name}Mvp{i}"], timeout=10)
        time.sleep(2.0)  # past start-up: what stays
        return tree(rig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--sizes", default="1,4,16", help="resource counts, default 1,4,16")
    args = p.parse_args(argv)
    sizes = sorted({int(s) for s in args.sizes.split(",")})
    if os.geteuid() != 0:
        print("memory: run as root (network namespaces, supervisord)", file=sys.stderr)
        return 2
    if len(sizes) < 2 or sizes[0] < 1 or sizes[-1] > 64:
        p.error("give at least two sizes between 1 and 64")
    rows = []
    try:
        for n in sizes:
            rows.append((n, *measure(n)))
            print(f"  {n} resources: tree PSS {rows[-1][1]:.1f} MiB", file=sys.stderr)
    except BenchError as err:
        print(f"memory: failed: {err}", file=sys.stderr)
        return 1
    (n0, p0, *_), (n1, p1, *_) = rows[0], rows[-1]
    per = (p1 - p0) / (n1 - n0)
    fixed = p0 - per * n0
    print("resources | tree PSS MiB | serve RSS MiB | serve USS MiB")
    print("----------+--------------+---------------+--------------")
    for n, pss, rss, uss in rows:
        print(f"{n:>9} | {pss:12.1f} | {rss:13.1f} | {uss:12.1f}")
    print(f"\nfit: {fixed:.1f} MiB + {per:.1f} MiB per resource ({CAPACITY} devices each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
