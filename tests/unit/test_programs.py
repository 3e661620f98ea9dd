"""Resource program files and the reconcile pass, against supervisor's own config parser.

A stand-in for supervisord's XML-RPC interface re-reads the rendered config with
supervisor's ``ServerOptions`` and compares process groups as ``diff_to_active``
does, so "unchanged file, untouched process" is checked with supervisor's notion
of a changed program.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from supervisor.options import ServerOptions

from macvtapdp import config, settings
from macvtapdp.config import Mode, Resource
from macvtapdp.errors import Refused, Unreachable
from macvtapdp.linux.link import Link
from macvtapdp.linux.linkevents import DELLINK, NEWLINK
from macvtapdp.node import apply, programs, reconcile, render
from macvtapdp.node.discovery import Facts, Filters
from macvtapdp.node.wanted import WantedResources
from macvtapdp.rundir import Layout

PLUGIN_DIR = "/p"
PCI = Facts(device=True, bus="pci")
NODE = settings.Node(plugin=settings.Plugin(plugin_dir=PLUGIN_DIR), metrics_address="")


def group_configs(conf: str) -> dict[str, Any]:
    options = ServerOptions()
    options.realize(args=["-c", conf])
    return {g.name: g for g in options.process_group_configs}


class FakeSupervisor:
    """supervisord's reloadConfig/stop/remove/addProcessGroup, on supervisor's parser.

    The same interface as ``control.Supervisor``: ``call`` and ``processes``.
    """

    def __init__(self, conf: str) -> None:
        self.conf = conf
        self.running = group_configs(conf)
        self.stopped: set[str] = set()
        self.loaded = dict(self.running)
        self.calls: list[tuple[str, ...]] = []
        self.down = False

    def _record(self, *call: str) -> None:
        if self.down:
            raise Unreachable("cannot reach supervisord: [Errno 111] Connection refused")
        self.calls.append(call)

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self, method)(*args)

    def processes(self) -> list[dict[str, Any]]:
        self._record("processes")
        return [
            {"name": n, "group": n, "statename": "STOPPED" if n in self.stopped else "RUNNING"}
            for n in self.running
        ]

    def reloadConfig(self) -> list[list[list[str]]]:
        self._record("reloadConfig")
        self.loaded = group_configs(self.conf)
        added = [n for n in self.loaded if n not in self.running]
        removed = [n for n in self.running if n not in self.loaded]
        changed = [
            n for n in self.loaded if n in self.running and self.loaded[n] != self.running[n]
        ]
        return [[added, changed, removed]]

    def stopProcessGroup(self, name: str, wait: bool) -> list[object]:
        assert not wait  # waiting would take supervisord's next 1 s poll per group
        self._record("stop", name)
        if name not in self.running:
            raise Refused(10, f"BAD_NAME: {name}")
        self.stopped.add(name)
        return []

    def removeProcessGroup(self, name: str) -> bool:
        self._record("remove", name)
        if name not in self.running:
            raise Refused(10, f"BAD_NAME: {name}")
        assert name in self.stopped, f"{name} removed while running"
        del self.running[name]
        self.stopped.discard(name)
        return True

    def addProcessGroup(self, name: str) -> bool:
        self._record("add", name)
        if name in self.running:
            raise Refused(90, f"ALREADY_ADDED: {name}")
        self.running[name] = self.loaded[name]
        return True

    def touched(self) -> list[tuple[str, ...]]:
        """Every call that changes something."""
        return [c for c in self.calls if c[0] not in ("reloadConfig", "processes")]


# -- program files -------------------------------------------------------------------------


def test_text_is_deterministic_and_changes_with_every_setting() -> None:
    res = Resource("a", "eth0")
    text = programs.text(NODE, res)
    assert text == programs.text(NODE, Resource("a", "eth0"))
    assert "[program:resource-a]" in text
    for other in (
        Resource("a", "eth1"),
        Resource("a", "eth0", Mode.VEPA),
        Resource("a", "eth0", capacity=7),
    ):
        assert programs.text(NODE, other) != text
    assert (
        programs.text(
            settings.Node(plugin=settings.Plugin(plugin_dir="/q"), metrics_address=""), res
        )
        != text
    )


def test_write_creates_then_leaves_identical_files_alone(tmp_path: Path) -> None:
    layout = Layout(str(tmp_path))
    resources = [Resource("a", "eth0"), Resource("b", "eth1", Mode.VEPA, 3)]
    written = programs.write(layout, NODE, resources)
    assert written == programs.Written(created=("a", "b"))
    assert sorted(os.listdir(layout.programs_dir)) == ["resource-a.conf", "resource-b.conf"]
    path = Path(layout.programs_dir, "resource-a.conf")
    before = path.read_bytes(), os.stat(path).st_ino
    again = programs.write(layout, NODE, list(reversed(resources)))
    assert not again.changed
    assert (path.read_bytes(), os.stat(path).st_ino) == before  # not even rewritten
    assert programs.current(layout) == {"a": resources[0], "b": resources[1]}


def test_write_updates_changed_and_deletes_unwanted_files(tmp_path: Path) -> None:
    layout = Layout(str(tmp_path))
    programs.write(layout, NODE, [Resource("a", "eth0"), Resource("b", "eth1")])
    stray = Path(layout.programs_dir, "resource-a.conf.999.tmp")
    stray.write_text("half")
    other = Path(layout.programs_dir, "someone-else.conf")
    other.write_text("; not ours\n")
    written = programs.write(
        layout, NODE, [Resource("a", "eth0", Mode.VEPA), Resource("c", "eth2")]
    )
    assert written == programs.Written(created=("c",), updated=("a",), deleted=("b",))
    assert not stray.exists() and other.exists()
    assert programs.current(layout) == {
        "a": Resource("a", "eth0", Mode.VEPA),
        "c": Resource("c", "eth2"),
    }


def test_a_file_we_cannot_read_back_is_reported_as_unknown(tmp_path: Path) -> None:
    layout = Layout(str(tmp_path))
    os.makedirs(layout.programs_dir)
    Path(layout.programs_dir, "resource-x.conf").write_text("[program:resource-x]\n")
    assert programs.current(layout) == {"x": None}


def render_dynamic(layout: Layout) -> None:
    Path(layout.conf).write_text(render.render(NODE, [], layout, dynamic=True))


def test_supervisor_sees_only_the_changed_program_as_changed(tmp_path: Path) -> None:
    layout = Layout(str(tmp_path))
    render_dynamic(layout)
    programs.write(layout, NODE, [Resource("a", "eth0"), Resource("b", "eth1")])
    first = group_configs(layout.conf)
    programs.write(layout, NODE, [Resource("a", "eth0"), Resource("b", "eth1", Mode.VEPA)])
    second = group_configs(layout.conf)
    assert set(first) == set(second) == {"reconcile", "watchdog", "resource-a", "resource-b"}
    assert first["resource-a"] == second["resource-a"]
    assert first["resource-b"] != second["resource-b"]
    assert first["reconcile"] == second["reconcile"]


# -- applying through supervisord ----------------------------------------------------------


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    layout = Layout(str(tmp_path / "run"))
    os.makedirs(layout.run_dir)
    render_dynamic(layout)
    return layout


def test_apply_acts_like_supervisorctl_update_on_resources_only(layout: Layout) -> None:
    old = [Resource("a", "eth0"), Resource("b", "eth1"), Resource("c", "eth2")]
    programs.write(layout, NODE, old)
    sup = FakeSupervisor(layout.conf)
    new = [Resource("a", "eth0"), Resource("b", "eth1", Mode.VEPA), Resource("d", "eth3")]
    programs.write(layout, NODE, new)
    # someone edited the main file: the helper programs are not ours to restart
    Path(layout.conf).write_text(
        Path(layout.conf).read_text().replace("buffer_size=100", "buffer_size=99")
    )
    lines = apply.apply(
        sup, {r.name: r for r in old}, {r.name: r for r in new}, {"c": "link eth2 gone"}
    )
    # added first (nothing waits behind the stops), every stop at once, then the rest
    assert sup.touched() == [
        ("add", "resource-d"),
        ("stop", "resource-c"),
        ("stop", "resource-b"),
        ("remove", "resource-c"),
        ("remove", "resource-b"),
        ("add", "resource-b"),
    ]
    assert lines == [
        "added resource d: lower link eth3, mode bridge, 100 devices",
        "removed resource c (link eth2 gone)",
        "restarted resource b: mode bridge -> vepa",
    ]


def test_apply_finishes_a_half_done_change(layout: Layout) -> None:
    programs.write(layout, NODE, [Resource("a", "eth0")])
    sup = FakeSupervisor(layout.conf)
    programs.write(layout, NODE, [Resource("a", "eth0", capacity=5)])
    del sup.running["resource-a"]  # stopped and removed, then the connection broke
    lines = apply.apply(sup, {}, {"a": Resource("a", "eth0", capacity=5)})
    assert sup.touched() == [("add", "resource-a")]
    assert lines == ["added resource a: lower link eth0, mode bridge, 5 devices"]


def test_difference_names_each_changed_setting() -> None:
    old = Resource("a", "eth0")
    assert apply.difference(old, Resource("a", "eth1", Mode.VEPA, 4)) == (
        "lower link eth0 -> eth1, mode bridge -> vepa, capacity 100 -> 4"
    )
    assert apply.difference(old, old) == ""
    assert apply.difference(None, old) == ""


# -- the reconcile pass --------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def links(*names: str) -> list[Link]:
    return [Link(index=i + 2, name=n) for i, n in enumerate(names)]


class Node:
    """A Reconciler with fake links, a fake supervisord and a controllable clock."""

    def __init__(self, layout: Layout, config_file: str | None = None, *names: str) -> None:
        self.layout = layout
        self.links = links(*names)
        self.clock = Clock()
        self.sup = FakeSupervisor(layout.conf)
        self.wanted = WantedResources(
            PLUGIN_DIR,
            config_file=config_file,
            filters=Filters(),
            grace=5.0,
            links=lambda: self.links,
            facts_of=lambda name: PCI,
        )
        self.rec = reconcile.Reconciler(
            layout,
            NODE,
            self.wanted,
            self.sup,
            clock=self.clock,
        )

    def running(self) -> list[str]:
        return sorted(n for n in self.sup.running if n.startswith("resource-"))


def started(
    layout: Layout, resources: list[Resource], *names: str, file: str | None = None
) -> Node:
    """As ``run`` leaves things: files written, supervisord running them."""
    programs.write(layout, NODE, resources)
    return Node(layout, file, *names)


def test_discovery_pass_adds_new_links_and_removes_gone_ones_after_the_grace(
    layout: Layout, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    node = started(layout, [Resource("eth0", "eth0"), Resource("eth1", "eth1")], "eth0", "eth1")
    assert node.rec.reconcile() is None
    assert node.sup.touched() == []  # what run wrote is what should run

    node.links = links("eth0", "eth1", "eth2")
    node.rec.reconcile()
    assert node.sup.touched() == [("add", "resource-eth2")]

    node.links = links("eth0", "eth2")
    node.clock.now += 1
    wake = node.rec.reconcile()
    assert wake == node.clock.now + 5.0
    assert "resource-eth1" in node.running() and len(node.sup.touched()) == 1
    assert "link eth1 is gone: removing its resource in 5 s unless it comes back" in caplog.text

    node.clock.now += 3  # back within the grace (a driver reload): nothing restarts
    node.links = links("eth0", "eth2", "eth1")
    node.rec.reconcile()
    assert len(node.sup.touched()) == 1
    assert "link eth1 is back" in caplog.text

    node.links = links("eth0", "eth2")
    node.clock.now += 1
    wake = node.rec.reconcile()
    assert wake is not None
    node.clock.now = wake - 0.1
    node.rec.reconcile()
    assert "resource-eth1" in node.running()
    node.clock.now = wake
    assert node.rec.reconcile() is None
    assert node.sup.touched()[1:] == [("stop", "resource-eth1"), ("remove", "resource-eth1")]
    assert node.running() == ["resource-eth0", "resource-eth2"]
    assert sorted(programs.current(layout)) == ["eth0", "eth2"]
    assert "removed resource eth1 (link eth1 gone for 5 s)" in caplog.text
    assert not any("eth0" in c[1] for c in node.sup.touched())


def test_link_events_that_cannot_change_the_set_are_ignored(layout: Layout) -> None:
    node = started(layout, [Resource("eth0", "eth0")], "eth0")
    node.rec.reconcile()
    [eth0] = node.links
    assert not node.wanted.relevant(NEWLINK, eth0)  # e.g. carrier lost: serve's business
    assert not node.wanted.relevant(NEWLINK, Link(index=50, name="mvt0", kind="macvtap"))
    assert not node.wanted.relevant(DELLINK, Link(index=50, name="mvt0", kind="macvtap"))
    assert node.wanted.relevant(NEWLINK, Link(index=51, name="eth9"))
    assert node.wanted.relevant(NEWLINK, Link(index=eth0.index, name="wan0"))  # renamed
    assert node.wanted.relevant(NEWLINK, Link(index=eth0.index, name="eth0", master_index=9))
    assert node.wanted.relevant(DELLINK, eth0)


def write_config(path: Path, resources: list[dict[str, Any]] | str) -> None:
    text = resources if isinstance(resources, str) else json.dumps(resources)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_config_file_change_restarts_exactly_the_changed_resources(
    layout: Layout, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    file = tmp_path / "config.json"
    write_config(file, [{"name": n, "master": f"eth{i}"} for i, n in enumerate("abc")])
    conf = config.load(file=str(file))
    node = started(layout, list(conf.resources), file=str(file))
    node.rec.reconcile()  # at start
    write_config(
        file, [{"name": n, "master": f"eth{i}"} for i, n in reversed(list(enumerate("abc")))]
    )
    node.rec.reconcile(file_event=True)
    assert node.sup.touched() == []
    assert "configuration unchanged" in caplog.text

    write_config(
        file,
        [
            {"name": "a", "master": "eth0"},
            {"name": "b", "master": "eth1", "mode": "vepa"},
            {"name": "d", "lowerDevice": "eth3", "capacity": 2},
        ],
    )
    node.rec.reconcile(file_event=True)
    assert node.sup.touched() == [
        ("add", "resource-d"),
        ("stop", "resource-c"),
        ("stop", "resource-b"),
        ("remove", "resource-c"),
        ("remove", "resource-b"),
        ("add", "resource-b"),
    ]
    assert node.running() == ["resource-a", "resource-b", "resource-d"]
    for line in (
        "removed resource c",
        "restarted resource b: mode bridge -> vepa",
        "added resource d: lower link eth3, mode bridge, 2 devices",
    ):
        assert line in caplog.text


def test_invalid_config_file_changes_nothing_and_logs_each_problem_once(
    layout: Layout, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    file = tmp_path / "config.json"
    write_config(file, [{"name": "a", "master": "eth0"}, {"name": "b", "master": "eth1"}])
    node = started(layout, list(config.load(file=str(file)).resources), file=str(file))
    files = {p: Path(layout.programs_dir, p).read_bytes() for p in os.listdir(layout.programs_dir)}
    write_config(file, '[{"name": "a", "master": "eth0", "mode": "nope"}, {"name": "b"}]')
    node.rec.reconcile(file_event=True)
    node.rec.reconcile(file_event=True)
    assert node.sup.touched() == []
    assert {
        p: Path(layout.programs_dir, p).read_bytes() for p in os.listdir(layout.programs_dir)
    } == files
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [
        f"invalid configuration in {file}; keeping the current one (2 problems):",
        f'  {file}[0].mode: unknown mode "nope"; expected one of: bridge, passthru, private, vepa',
        f'  {file}[1].master: is required (or its alias "lowerDevice")',
    ]
    write_config(file, "[{")
    node.rec.reconcile(file_event=True)
    assert node.sup.touched() == []
    assert caplog.records[-1].getMessage().startswith(f"  {file}: invalid JSON")
    write_config(file, [{"name": "a", "master": "eth0"}])  # valid again: applied
    node.rec.reconcile(file_event=True)
    assert node.sup.touched() == [("stop", "resource-b"), ("remove", "resource-b")]


def test_config_file_in_discovery_mode_follows_links(layout: Layout, tmp_path: Path) -> None:
    file = tmp_path / "config.json"
    write_config(file, [{"name": "a", "master": "eth0"}])
    node = started(layout, [Resource("a", "eth0")], "eth0", file=str(file))
    write_config(file, "[]")
    node.rec.reconcile(file_event=True)
    assert node.wanted.discovering
    # "a" was configured, not discovered: there is no link to wait for
    assert node.sup.touched() == [
        ("add", "resource-eth0"),
        ("stop", "resource-a"),
        ("remove", "resource-a"),
    ]
    node.links = []  # a discovered resource does wait for its link
    node.rec.reconcile()
    assert node.running() == ["resource-eth0"]


def test_supervisord_unreachable_fails_the_pass_and_the_next_one_catches_up(
    layout: Layout,
) -> None:
    node = started(layout, [Resource("eth0", "eth0")], "eth0", "eth1")
    node.sup.down = True
    with pytest.raises(Unreachable):
        node.rec.reconcile()
    assert "eth1" in programs.current(layout)  # written, not yet applied
    node.sup.down = False
    node.rec.reconcile()
    assert node.sup.touched() == [("add", "resource-eth1")]


def test_file_watches_see_a_configmap_swap_and_a_symlink_target_edited_in_place(
    tmp_path: Path,
) -> None:
    volume = tmp_path / "volume"
    (volume / "..v1").mkdir(parents=True)
    (volume / "..v1" / "config.json").write_text("[]")
    (volume / "..data").symlink_to("..v1")
    (volume / "config.json").symlink_to("..data/config.json")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "real.json").write_text("[]")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").symlink_to(elsewhere / "real.json")

    def ready(watches: reconcile.FileWatches) -> bool:
        fds = watches.filenos()
        return watches.changed(select.select(fds, [], [], 1.0)[0])

    swap = reconcile.FileWatches(str(volume / "config.json"))
    edit = reconcile.FileWatches(str(tmp_path / "cfg" / "config.json"))
    try:
        (volume / "..v2").mkdir()
        (volume / "..v2" / "config.json").write_text("[{}]")
        (volume / "..data_tmp").symlink_to("..v2")
        os.replace(volume / "..data_tmp", volume / "..data")
        assert ready(swap)
        swap.follow()
        shutil.rmtree(volume / "..v1")
        assert ready(swap)
        (elsewhere / "real.json").write_text("[{}]")  # in place, through no symlink
        assert ready(edit)
        assert not ready(edit)  # drained
    finally:
        swap.close()
        edit.close()


def test_reconcile_retries_while_supervisord_is_away_and_exits_0_on_sigterm(
    tmp_path: Path,
) -> None:
    file = tmp_path / "config.json"
    write_config(file, [{"name": "a", "master": "eth0"}])
    run_dir = tmp_path / "run"
    node = settings.Node(
        plugin=settings.Plugin(plugin_dir="/p", run_dir=str(run_dir)), config_file=str(file)
    )
    argv = render.node_argv("macvtapdp.node.reconcile", node)
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        assert proc.stdout is not None
        try:
            lines = []
            for line in proc.stdout:  # no supervisord: the pass fails and is retried
                lines.append(line)
                if "trying again in 1 s" in line:
                    break
            assert programs.current(Layout(str(run_dir))) == {"a": Resource("a", "eth0")}
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(5) == 0
            rest = proc.stdout.read()
        finally:
            proc.kill()
    text = "".join(lines) + rest
    assert "pass failed" in text and "Traceback" not in text and "[reconcile] stopped" in rest
