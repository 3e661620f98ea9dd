"""The sweep's decision, its period, its setting, and the PodResources client against the
kubelet stand-in's PodResources server (real gRPC on a unix socket)."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from harness.kubelet import RATE_LIMITED, FakeKubelet
from harness.processes import rmtree, short_tempdir
from macvtapdp import config, settings
from macvtapdp.config import Resource
from macvtapdp.errors import PermanentError, Unreachable
from macvtapdp.plugin import sweep
from macvtapdp.plugin.podresources import PodResources
from macvtapdp.plugin.sweep import decide

GRACE = 300.0
A, B, C = "a0Mvp0", "a0Mvp1", "a0Mvp2"


# -- decide -------------------------------------------------------------------------------


def test_a_device_first_seen_unheld_starts_its_clock_and_stays() -> None:
    got = decide(held=set(), own={A}, unheld_since={}, now=1000.0, grace=GRACE)
    assert got.delete == () and got.unheld_since == {A: 1000.0}


def test_a_device_unheld_for_the_whole_grace_goes() -> None:
    clocks = {A: 1000.0, B: 1000.0 + 1}
    got = decide(held=set(), own={A, B}, unheld_since=clocks, now=1000.0 + GRACE, grace=GRACE)
    assert got.delete == (A,)
    assert got.unheld_since == clocks  # B keeps its clock


def test_a_held_device_never_goes_and_loses_its_clock() -> None:
    got = decide(held={A}, own={A}, unheld_since={A: 0.0}, now=1e9, grace=GRACE)
    assert got == sweep.Decision((), {})


def test_a_device_without_a_macvtap_loses_its_clock() -> None:
    got = decide(held=set(), own={B}, unheld_since={A: 0.0, B: 0.0}, now=1e9, grace=GRACE)
    assert got.delete == (B,) and set(got.unheld_since) == {B}


def test_held_devices_of_no_macvtap_change_nothing() -> None:
    got = decide(held={C}, own=set(), unheld_since={}, now=1e9, grace=GRACE)
    assert got == sweep.Decision((), {})


def test_the_clock_never_starts_before_the_last_use() -> None:
    """A leaked macvtap that an Allocate reuses gets a whole grace for its pod to be listed."""
    clocks = {A: 0.0, B: 0.0}
    used = {A: 900.0, B: 10.0}
    got = decide(set(), {A, B}, clocks, now=1000.0, grace=GRACE, used=used)
    assert got.delete == (B,)
    assert got.unheld_since[A] == 900.0
    later = decide(set(), {A}, got.unheld_since, now=900.0 + GRACE, grace=GRACE, used=used)
    assert later.delete == (A,)


def test_a_device_allocated_but_not_listed_yet_waits_a_whole_grace() -> None:
    """Its pod listed only later: a whole grace from the first round that saw it unheld."""
    used = {A: 999.0}
    got = decide(set(), {A}, {}, now=1000.0, grace=GRACE, used=used)
    assert got.delete == () and got.unheld_since == {A: 1000.0}
    almost = decide(set(), {A}, got.unheld_since, now=999.0 + GRACE, grace=GRACE, used=used)
    assert almost.delete == ()
    listed = decide({A}, {A}, almost.unheld_since, now=1000.0 + GRACE, grace=GRACE, used=used)
    assert listed == sweep.Decision((), {})


def test_deletions_come_in_a_stable_order() -> None:
    own = {C, A, B}
    got = decide(set(), own, dict.fromkeys(own, 0.0), now=GRACE, grace=GRACE)
    assert got.delete == (A, B, C)


# -- period and setting -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("grace", "period"), [(300.0, 30.0), (3600.0, 30.0), (60.0, 6.0), (5.0, 1.0), (1.0, 1.0)]
)
def test_period_is_a_tenth_of_the_grace_within_bounds(grace: float, period: float) -> None:
    assert sweep.period(grace) == period


def test_rounds_of_a_whole_node_stay_far_below_the_kubelets_rate_limit() -> None:
    """100 resources at the shortest period: 100 Lists a second at most, the kubelet's QPS;
    at the default grace, a few a second."""
    assert 100 / sweep.period(settings.DEFAULT_SWEEP_GRACE) <= 100 / 30


@pytest.mark.parametrize("bad", [-1.0, math.inf, math.nan])
def test_sweep_grace_must_be_finite_and_not_negative(bad: float) -> None:
    with pytest.raises(PermanentError, match=r"^--sweep-grace: "):
        settings.check_sweep_grace(bad)


def test_sweep_settings_reach_the_resource_process() -> None:
    plugin = settings.Plugin(pod_resources_socket="/x/pr.sock", sweep_grace=1.5)
    argv = settings.to_argv(settings.Serve(resource=_resource(), plugin=plugin))
    assert "--sweep-grace=1.5" in argv and "--pod-resources-socket=/x/pr.sock" in argv
    back = settings.from_argv(settings.Serve, argv)
    assert back.plugin.sweep_grace == 1.5 and back.plugin.pod_resources_socket == "/x/pr.sock"


def _resource() -> Resource:
    return config.resource({"name": "a0", "master": "eth0"}, "test")


# -- the PodResources client ----------------------------------------------------------------


@pytest.fixture
def tmp() -> Iterator[str]:
    path = short_tempdir()
    try:
        yield path
    finally:
        rmtree(path)


@pytest.fixture
def kubelet(tmp: str) -> Iterator[FakeKubelet]:
    with FakeKubelet(
        os.path.join(tmp, "dp"), pod_resources_socket=os.path.join(tmp, "pr", "kubelet.sock")
    ) as k:
        yield k


def client(kubelet: FakeKubelet, timeout: float = 5.0) -> PodResources:
    assert kubelet.pod_resources_socket is not None
    return PodResources(kubelet.pod_resources_socket, timeout)


def test_held_are_the_resources_devices_of_every_active_pod(kubelet: FakeKubelet) -> None:
    r, other = "macvtap.network.kubevirt.io/a0", "macvtap.network.kubevirt.io/b0"
    kubelet.add_pod("vm1", "default", {"compute": {r: [A]}, "sidecar": {other: ["b0Mvp0"]}})
    kubelet.add_pod("vm2", "ns2", {"init": {}, "compute": {r: [B, C]}})
    kubelet.add_pod("done", "default", {"compute": {r: ["a0Mvp3"]}})
    kubelet.terminate_pod("done")
    pr = client(kubelet)
    assert pr.held(r) == {A, B, C}
    assert pr.held(other) == {"b0Mvp0"}
    kubelet.remove_pod("vm2", "ns2")
    assert pr.held(r) == {A}
    assert pr.held("macvtap.network.kubevirt.io/none") == frozenset()


def test_no_socket_is_unreachable(tmp: str) -> None:
    path = os.path.join(tmp, "missing.sock")
    with pytest.raises(Unreachable, match=rf"^no socket at {path}$"):
        PodResources(path).held("r")


def test_a_dead_socket_is_unreachable(kubelet: FakeKubelet) -> None:
    kubelet.stop_pod_resources(leave_socket=True)
    with pytest.raises(Unreachable, match=r"does not answer$"):
        client(kubelet).held("r")


@pytest.mark.parametrize(
    ("code", "details", "shown"),
    [
        (grpc.StatusCode.RESOURCE_EXHAUSTED, RATE_LIMITED, f'RESOURCE_EXHAUSTED: "{RATE_LIMITED}"'),
        (grpc.StatusCode.INTERNAL, "boom\nforged line", 'INTERNAL: "boom\\nforged line"'),
    ],
)
def test_an_error_answer_is_unreachable(
    kubelet: FakeKubelet, code: grpc.StatusCode, details: str, shown: str
) -> None:
    kubelet.pod_resources_fail(code, details)
    with pytest.raises(Unreachable) as caught:
        client(kubelet).held("r")
    assert str(caught.value) == f"the kubelet answered List with {shown}"
    assert isinstance(caught.value.__cause__, grpc.RpcError)
    kubelet.pod_resources_fail(None)
    assert client(kubelet).held("r") == frozenset()


def test_a_silent_server_times_out(tmp: str) -> None:
    """A socket that accepts and never answers (a hung kubelet): Unreachable after the timeout."""
    path = os.path.join(tmp, "hung.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as hung:
        hung.bind(path)
        hung.listen(8)
        with pytest.raises(Unreachable, match=r"^no answer from .* in 0.5 s$"):
            PodResources(path, timeout=0.5).held("r")


def test_cancel_ends_a_call_in_flight_and_refuses_more(tmp: str) -> None:
    path = os.path.join(tmp, "hung.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as hung:
        hung.bind(path)
        hung.listen(8)
        pr = PodResources(path, timeout=60.0)
        failed: list[BaseException] = []

        def call() -> None:
            try:
                pr.held("r")
            except Unreachable as err:
                failed.append(err)

        caller = threading.Thread(target=call)
        caller.start()
        time.sleep(0.2)  # let the call get under way
        pr.cancel()
        caller.join(10)
        assert not caller.is_alive()
        assert [str(e) for e in failed] == ["the PodResources client is shutting down"]
        with pytest.raises(Unreachable, match="shutting down"):
            pr.held("r")


@pytest.mark.parametrize(
    ("args", "env"),
    [(["--sweep-grace=inf"], {}), ([], {"MACVTAPDP_SWEEP_GRACE": "nan"})],
    ids=["flag", "env"],
)
def test_run_refuses_a_grace_that_is_no_number_of_seconds(
    args: list[str], env: dict[str, str]
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "macvtapdp", "render-config", *args],
        env={**os.environ, "DP_MACVTAP_CONF": "[]", **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("macvtapdp: error: --sweep-grace: ")
    assert len(done.stderr.splitlines()) == 1
