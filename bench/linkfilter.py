"""What the kernel-side link event filter saves: CPU of resource processes during link churn.

Run as root from the repository root:

    .venv/bin/python bench/linkfilter.py [--resources 3] [--pairs 1000]

Starts ``--resources`` real resource processes (``python -m macvtapdp.plugin``) in a fresh
network namespace with a kubelet stand-in, once with the BPF filter on their link-event
sockets and once without (``--link-filter=false``), and creates and deletes ``--pairs``
unrelated veth pairs in that namespace (one ``ip -batch``, as a container runtime would make
them). Prints the CPU time (user + system, from /proc) the resource processes used meanwhile.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from harness.kubelet import FakeKubelet  # noqa: E402
from harness.netns import NetNS  # noqa: E402
from harness.processes import Proc, rmtree, serve_argv, short_tempdir  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def churn(ns: NetNS, pairs: int) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".batch") as batch:
        for i in range(pairs):
            batch.write(f"link add churn{i} type veth peer name churn{i}p\n")
        for i in range(pairs):
            batch.write(f"link del churn{i}\n")
        batch.flush()
        ns.ip("-batch", batch.name)


def run(resources: int, pairs: int, kernel_filter: bool) -> float:
    ns = NetNS()
    plugin_dir = short_tempdir()
    kubelet = FakeKubelet(plugin_dir)
    procs: list[Proc] = []
    try:
        kubelet.start()
        names = [f"lf{i}" for i in range(resources)]
        for name in names:
            ns.veth(name)
            argv = serve_argv(
                name, plugin_dir, f"--lower={name}", "--capacity=10",
                f"--link-filter={'true' if kernel_filter else 'false'}",
            )  # fmt: skip
            procs.append(Proc(ns, argv))
        for name in names:
            resource = f"macvtap.network.kubevirt.io/{name}"
            if not kubelet.wait_for(resource, lambda s: s.allocatable == 10, 15):
                raise SystemExit(f"{name} did not come up")
        time.sleep(0.5)
        before = sum(cpu_seconds(p.pid) for p in procs)
        churn(ns, pairs)
        time.sleep(1.0)  # let them read what is queued
        return sum(cpu_seconds(p.pid) for p in procs) - before
    finally:
        for p in procs:
            p.terminate()
        kubelet.stop()
        rmtree(plugin_dir)
        ns.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resources", type=int, default=3)
    p.add_argument("--pairs", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    for kernel_filter in (True, False):
        samples = sorted(run(args.resources, args.pairs, kernel_filter) for _ in range(args.rounds))
        label = "with the filter   " if kernel_filter else "without the filter"
        print(
            f"{label}: {args.resources} resource processes used "
            f"{samples[len(samples) // 2] * 1000:.0f} ms CPU (median of {args.rounds}; "
            f"all {', '.join(f'{s * 1000:.0f}' for s in samples)}) while {args.pairs} veth "
            "pairs were created and deleted",
            flush=True,
        )


if __name__ == "__main__":
    main()
