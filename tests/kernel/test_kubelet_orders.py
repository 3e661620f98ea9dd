"""The real resource process with the two registration orders kubelets have used.

Kubelets from 1.25 dial back and call GetDevicePluginOptions before answering
Register, and use that answer; kubelet 1.20 answers Register at once, dials
afterwards, takes the options from the RegisterRequest and never calls
GetDevicePluginOptions. The plugin sends the same options both ways
(pre_start_required), so either kubelet calls PreStartContainer before every
container start.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from harness.kubelet import OPTIONS_FROM_PLUGIN, OPTIONS_FROM_REGISTER, FakeKubelet, Order
from harness.netns import NetNS
from harness.processes import Proc, all_healthy, resource, rmtree, serve_argv, short_tempdir

pytestmark = pytest.mark.kernel

NAME = "lw0"
CAPACITY = 4


@pytest.fixture(params=["sync", "legacy"])
def kubelet(request: pytest.FixtureRequest) -> Iterator[FakeKubelet]:
    plugin_dir = short_tempdir()
    order: Order = request.param
    stand_in = FakeKubelet(plugin_dir, order=order)
    try:
        yield stand_in
    finally:
        stand_in.stop()
        rmtree(plugin_dir)


def test_registers_serves_and_is_pre_started_in_either_order(
    netns: NetNS, kubelet: FakeKubelet
) -> None:
    netns.veth(NAME)
    kubelet.start()
    proc = Proc(
        netns, serve_argv(NAME, kubelet.plugin_dir, f"--lower={NAME}", f"--capacity={CAPACITY}")
    )
    try:
        assert kubelet.wait_for(resource(NAME), all_healthy(CAPACITY), 15.0)
        state = kubelet.state(resource(NAME))
        [registration] = [r for r in kubelet.registrations if r.error is None]
        # the request carries the options, as 1.20 reads them
        assert registration.options is not None and registration.options.pre_start_required
        legacy = kubelet.order == "legacy"
        assert state.options_source == (OPTIONS_FROM_REGISTER if legacy else OPTIONS_FROM_PLUGIN)
        assert state.options is not None and state.options.pre_start_required

        response = kubelet.admit("vm", "compute", resource(NAME), 1)
        [spec] = response.devices
        started = kubelet.start_container("vm", "compute")
        assert started.pre_started == (resource(NAME),)
        assert [d.host_path for d in started.devices] == [spec.host_path]
        again = kubelet.start_container("vm", "compute")  # a restart: PreStartContainer again
        assert again.pre_started == (resource(NAME),)
        assert proc.output.wait_for(rf"\[{NAME}\] registered {resource(NAME)}")
    finally:
        code = proc.terminate()
    assert code == 0, proc.output.text()
    assert "Traceback" not in proc.output.text()
