"""The metrics endpoint's answers, without supervisord: the files, the counts, the probes."""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from macvtapdp.node.metrics import Endpoint, _Families, split_address
from macvtapdp.rundir import Layout
from tests.unit.test_metricfiles import Writer


@pytest.fixture
def endpoint(tmp_path: Path) -> Iterator[Endpoint]:
    (tmp_path / "metrics").mkdir()
    pool = concurrent.futures.ThreadPoolExecutor(2)
    yield Endpoint(Layout(str(tmp_path)), pool)
    pool.shutdown()


def scraped(endpoint: Endpoint) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(_Families(endpoint.collect())).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_a_scrape_sums_the_files_and_adds_the_restart_counts(
    endpoint: Endpoint, tmp_path: Path
) -> None:
    Writer(tmp_path, "a", created=2, stay=False)
    Writer(tmp_path, "a", created=3, stay=False)  # restarted once
    Path(endpoint.layout.restarts_file).write_text(
        json.dumps({"restarts": {"resource-a": 1, "watchdog": 0}, "serial": 9})
    )
    got = scraped(endpoint)
    assert got[("macvtapdp_allocations_total", (("resource", "a"), ("result", "created")))] == 5
    assert got[("macvtapdp_registrations_total", (("resource", "a"),))] == 2
    assert got[("macvtapdp_program_restarts_total", (("program", "resource-a"),))] == 1
    assert got[("macvtapdp_program_restarts_total", (("program", "watchdog"),))] == 0
    assert not any(name == "macvtapdp_devices" for name, _ in got)  # both processes are dead
    assert sorted(p.name for p in (tmp_path / "metrics").iterdir()) == [
        "counter_archive.1.db", "histogram_archive.1.db", "restarts.json",
    ]  # fmt: skip
    assert scraped(endpoint) == got


def test_without_a_metrics_directory_a_scrape_has_only_the_restarts(tmp_path: Path) -> None:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        endpoint = Endpoint(Layout(str(tmp_path / "nothing")), pool)
        assert [m.name for m in endpoint.collect()] == ["macvtapdp_program_restarts"]


def test_without_supervisord_neither_alive_nor_ready(endpoint: Endpoint) -> None:
    alive, why = endpoint.check_alive()
    assert not alive and why.startswith("supervisord does not answer: cannot reach supervisord")
    ready, why = endpoint.check_ready()
    assert not ready and why.startswith("supervisord does not answer")


@pytest.mark.parametrize(
    ("address", "expected"),
    [("0.0.0.0:9469", ("0.0.0.0", 9469)), ("[::]:1", ("::", 1)), ("node-1:80", ("node-1", 80))],
)
def test_the_address_is_split_into_host_and_port(address: str, expected: tuple[str, int]) -> None:
    assert split_address(address) == expected
