"""The deployment artifacts: valid for Kubernetes, and in agreement with the code.

Every document in ``manifests/`` is checked against Kubernetes' OpenAPI schema
in strict mode (unknown fields fail) with ``kubernetes_validate``, which ships
the schemas in its package: nothing is fetched. The rest ties the manifests,
the Containerfile and ``etc/`` to the code: the commands they run are commands
the CLI has, with options it accepts, and the paths they mount are the paths
the code uses.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import typer.core
import typer.main
import yaml
from supervisor.options import ClientOptions

from macvtapdp import config, naming, rundir, settings
from macvtapdp.cli import app
from macvtapdp.errors import PermanentError
from macvtapdp.plugin import macvtap
from macvtapdp.rundir import Layout

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
CONTAINERFILE = ROOT / "Containerfile"
KUBERNETES = "1.34"
PLUGIN_DIR_ENV = "MACVTAPDP_PLUGIN_DIR"
RUN_DIR_ENV = "MACVTAPDP_RUN_DIR"

Doc = dict[str, Any]


def documents() -> list[tuple[str, Doc]]:
    """(``file:index``, document) for every YAML document under manifests/."""
    found = []
    for path in sorted(MANIFESTS.glob("*.yml")):
        docs = yaml.safe_load_all(path.read_text(encoding="utf-8"))
        found += [(f"{path.name}:{i}", doc) for i, doc in enumerate(docs) if doc is not None]
    return found


def only(kind: str) -> Doc:
    """The one manifest of ``kind`` (of DaemonSets: the plugin's, not the CNI install)."""
    matches = [
        doc
        for _, doc in documents()
        if doc["kind"] == kind and doc["metadata"]["name"] != "macvtap-cni-install"
    ]
    assert len(matches) == 1, f"expected one {kind} in manifests/, found {len(matches)}"
    return matches[0]


def plugin_container() -> Doc:
    containers: list[Doc] = only("DaemonSet")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def entrypoint() -> list[str]:
    """The Containerfile's ENTRYPOINT, which must be in exec (JSON) form."""
    lines = CONTAINERFILE.read_text(encoding="utf-8").splitlines()
    found = [line.split(None, 1)[1] for line in lines if line.startswith("ENTRYPOINT ")]
    assert len(found) == 1, "the Containerfile needs exactly one ENTRYPOINT"
    argv: list[str] = json.loads(found[0])
    return argv


def container_argv(container: Doc) -> list[str]:
    """What the container runs: ``command`` replaces the image's ENTRYPOINT."""
    return [*container.get("command", entrypoint()), *container.get("args", [])]


def cli_options(argv: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Doc:
    """Parse ``argv`` as the CLI would in an environment of ``env``; its options' values.

    Fails if the program is not ``macvtapdp``, the subcommand does not exist,
    or an option is unknown. Nothing is run.
    """
    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup)
    assert argv[0] == "macvtapdp" and argv[0] in project()["scripts"], argv
    assert len(argv) > 1 and argv[1] in group.commands, (
        f"{argv}: not a command of the CLI ({', '.join(sorted(group.commands))})"
    )
    for name in (config.ENV_VAR, config.ENV_FILE_VAR, PLUGIN_DIR_ENV, RUN_DIR_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for s in (settings.METRICS_ADDRESS, settings.SWEEP_GRACE, settings.POD_RESOURCES_SOCKET):
        monkeypatch.delenv(s.env or "", raising=False)
    ctx = group.commands[argv[1]].make_context(argv[1], argv[2:])
    return dict(ctx.params)


def container_env(container: Doc) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def project() -> Doc:
    with (ROOT / "pyproject.toml").open("rb") as fh:
        data: Doc = tomllib.load(fh)["project"]
    return data


def schema_problem(doc: Doc) -> str | None:
    """Why ``doc`` is not a valid object of Kubernetes ``KUBERNETES`` (strict), or None."""
    try:
        used = kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    except kubernetes_validate.ValidationError as err:
        return f"{doc['kind']} {'.'.join(str(p) for p in err.path)}: {err.message}"
    # validate() falls back to the newest schemas it has that are not newer.
    return None if used == KUBERNETES else f"validated against {used}, not {KUBERNETES}"


@pytest.mark.parametrize(("where", "doc"), documents(), ids=[w for w, _ in documents()])
def test_manifest_is_valid_kubernetes(where: str, doc: Doc) -> None:
    assert schema_problem(doc) is None


def test_manifests_hold_the_expected_objects() -> None:
    kinds = sorted(doc["kind"] for _, doc in documents())
    assert kinds == ["ConfigMap", "DaemonSet", "DaemonSet", "Pod"]
    daemonset, configmap = only("DaemonSet"), only("ConfigMap")
    assert daemonset["metadata"]["name"] == "macvtap-device-plugin"
    assert configmap["metadata"]["name"] == "macvtapdp-config"
    # A pod can mount a ConfigMap of its own namespace only.
    assert daemonset["metadata"]["namespace"] == configmap["metadata"]["namespace"]


def test_plugin_runs_a_cli_command(monkeypatch: pytest.MonkeyPatch) -> None:
    container = plugin_container()
    argv = container_argv(container)
    assert argv[:2] == ["macvtapdp", "run"]
    cli_options(argv, container_env(container), monkeypatch)


@pytest.mark.parametrize(
    ("probe", "path"), [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")]
)
def test_probes_ask_the_metrics_endpoint(probe: str, path: str) -> None:
    container = plugin_container()
    get = container[probe]["httpGet"]
    assert get == {"path": path, "port": "metrics"}
    [port] = [p for p in container["ports"] if p["name"] == get["port"]]
    assert port["containerPort"] == settings.DEFAULT_METRICS_PORT
    assert settings.DEFAULT_METRICS_ADDRESS.endswith(f":{port['containerPort']}")


def test_the_exec_probes_documented_for_metrics_off_run_cli_commands(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    text = (MANIFESTS / "macvtapdp-daemonset.yml").read_text(encoding="utf-8")
    found = re.findall(r"^\s*#\s+command: \[(.+)\]$", text, re.MULTILINE)
    commands = [[w.strip() for w in line.split(",")] for line in found]
    assert ["macvtapdp", "status"] in commands and ["macvtapdp", "status", "--alive"] in commands
    for argv in commands:
        cli_options(argv, container_env(plugin_container()), monkeypatch)


def test_plugin_mounts_what_the_code_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    container = plugin_container()
    pod = only("DaemonSet")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    used = cli_options(container_argv(container), container_env(container), monkeypatch)

    assert used["run_dir"] == settings.DEFAULT_RUN_DIR
    # in memory, and made by `run` inside the emptyDir (which the kubelet makes 0777)
    run_parent = os.path.dirname(settings.DEFAULT_RUN_DIR)
    assert mounts[run_parent]["emptyDir"]["medium"] == "Memory"
    assert (
        settings.DEFAULT_RUN_DIR not in mounts or "emptyDir" not in mounts[settings.DEFAULT_RUN_DIR]
    )
    # the taps record outlives the pod (consumers' containers restart after a DaemonSet update)
    taps = mounts[Layout(settings.DEFAULT_RUN_DIR).taps_dir]["hostPath"]
    assert taps["path"].startswith("/run/") and taps["type"] == "DirectoryOrCreate"
    assert taps["path"] != Layout(settings.DEFAULT_RUN_DIR).taps_dir  # not a host instance's

    pod_resources = mounts[os.path.dirname(settings.DEFAULT_POD_RESOURCES_SOCKET)]
    assert pod_resources["hostPath"]["path"] == os.path.dirname(
        settings.DEFAULT_POD_RESOURCES_SOCKET
    )
    read_only = {m["mountPath"] for m in container["volumeMounts"] if m.get("readOnly")}
    assert os.path.dirname(settings.DEFAULT_POD_RESOURCES_SOCKET) in read_only
    assert mounts["/tmp"]["emptyDir"]["medium"] == "Memory"  # supervisord needs a temp dir

    assert used["plugin_dir"] == naming.DEFAULT_PLUGIN_DIR
    plugin_dir = {"path": naming.DEFAULT_PLUGIN_DIR, "type": "Directory"}
    assert mounts[naming.DEFAULT_PLUGIN_DIR]["hostPath"] == plugin_dir

    # Allocate checks the host's /dev/tapN; the runtime's /dev is a copy made at start.
    dev_dir = inspect.signature(macvtap.Macvtaps).parameters["dev_dir"].default
    assert mounts[dev_dir]["hostPath"] == {"path": "/dev", "type": "Directory"}


def test_the_run_directory_is_made_in_an_emptydir_as_the_kubelet_makes_it(tmp_path: Path) -> None:
    emptydir = tmp_path / "run"
    emptydir.mkdir()
    emptydir.chmod(0o777)  # the kubelet's emptyDir
    layout = Layout(str(emptydir / "macvtapdp"))
    os.makedirs(layout.taps_dir, 0o755)  # the hostPath mount point the runtime makes
    (Path(layout.taps_dir) / "a.json").write_text("{}")
    os.close(rundir.prepare(layout))
    assert os.stat(layout.run_dir).st_mode & 0o777 == 0o755  # made by the runtime: kept
    assert (Path(layout.taps_dir) / "a.json").exists()  # the record survives
    with pytest.raises(PermanentError, match="can be written by others"):
        rundir.prepare(Layout(str(emptydir)))  # the emptyDir itself would be refused


def test_the_pod_needs_no_api_access_and_keeps_only_the_privileges_it_needs() -> None:
    pod = only("DaemonSet")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["hostNetwork"] is True
    security = plugin_container()["securityContext"]
    assert security == {"privileged": True, "readOnlyRootFilesystem": True}
    ports = plugin_container()["ports"]
    assert [(p["name"], p["containerPort"]) for p in ports] == [
        ("metrics", settings.DEFAULT_METRICS_PORT)
    ]


def test_configuration_file_is_the_configmap_key(monkeypatch: pytest.MonkeyPatch) -> None:
    container = plugin_container()
    configmap = only("ConfigMap")
    used = cli_options(container_argv(container), container_env(container), monkeypatch)
    conf_file = used["config_file"]
    assert isinstance(conf_file, str)

    directory, key = os.path.split(conf_file)
    assert key == config.ENV_VAR and key in configmap["data"]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == directory)
    assert "subPath" not in mount  # a subPath mount never sees ConfigMap updates
    volume = next(
        v
        for v in only("DaemonSet")["spec"]["template"]["spec"]["volumes"]
        if v["name"] == mount["name"]
    )
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]


def test_configmap_default_is_discovery_mode() -> None:
    """Useful on any node: one resource per physical NIC or bond, whatever their names."""
    conf = config.parse(only("ConfigMap")["data"][config.ENV_VAR])
    assert conf.discovery and conf.resources == ()


def test_example_configuration_is_valid() -> None:
    path = ROOT / "etc" / "config.example.json"
    conf = config.parse(path.read_text(encoding="utf-8"), str(path))
    assert len(conf.resources) == 2
    assert {r.mode for r in conf.resources} == {config.Mode.BRIDGE, config.Mode.VEPA}


def test_consumer_requests_a_resource_discovery_offers_and_stays_running() -> None:
    """Discovery names a resource after its link: the consumer's must be a valid link name."""
    pod = only("Pod")["spec"]
    [container] = pod["containers"]
    resources = container["resources"]
    assert resources["requests"] == resources["limits"]  # extended resources need both
    [name] = resources["limits"]
    domain, _, link = name.partition("/")
    assert domain == naming.DOMAIN
    [offered] = config.parse(json.dumps([{"name": link, "master": link}])).resources
    assert offered.resource_name == name
    script = container["command"][-1]
    assert "ls -l /dev/tap*" in script and "while :" in script  # shows its tap, never exits
    assert pod.get("restartPolicy", "Always") == "Always"


def test_the_cni_install_copies_the_released_binary_where_runtimes_look() -> None:
    daemonset = next(
        doc
        for _, doc in documents()
        if doc["kind"] == "DaemonSet" and doc["metadata"]["name"] == "macvtap-cni-install"
    )
    pod = daemonset["spec"]["template"]["spec"]
    [init] = pod["initContainers"]
    assert init["image"] == "quay.io/kubevirt/macvtap-cni:v0.13.1"
    assert "/macvtap-cni" in init["command"][-1] and "/opt/cni/bin/macvtap" in init["command"][-1]
    assert init["securityContext"]["privileged"] is True  # as upstream's, for SELinux nodes
    [mount] = init["volumeMounts"]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["hostPath"]["path"] == "/opt/cni/bin"
    assert mount["mountPath"] == "/host/opt/cni/bin"


def test_containerfile_installs_the_entrypoint_and_supervisorctl_config() -> None:
    assert entrypoint() == ["macvtapdp", "run"]
    assert "macvtapdp" in project()["scripts"]
    lines = CONTAINERFILE.read_text(encoding="utf-8").splitlines()
    assert "COPY etc/supervisord.conf etc/" in lines  # the package's data file


def test_the_package_puts_the_supervisorctl_config_where_supervisorctl_looks_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with (ROOT / "pyproject.toml").open("rb") as fh:
        data_files = tomllib.load(fh)["tool"]["setuptools"]["data-files"]
    assert data_files == {"etc": ["etc/supervisord.conf"]}  # <prefix>/etc/supervisord.conf
    for prefix in ("/usr/local", "/opt/x/.venv"):
        monkeypatch.setattr(sys, "argv", [f"{prefix}/bin/supervisorctl"])
        assert ClientOptions().searchpaths[0] == f"{prefix}/etc/supervisord.conf"


def test_the_image_is_built_from_pinned_inputs() -> None:
    lines = CONTAINERFILE.read_text(encoding="utf-8").splitlines()
    bases = [line.split()[1] for line in lines if line.startswith("FROM ")]
    assert len(bases) == 2 and len(set(bases)) == 1, bases  # build and run on one base
    name, _, tag = bases[0].partition(":")
    assert name == "python" and re.fullmatch(r"3\.11\.\d+-slim-bookworm", tag), tag
    assert "ENV PIP_CONSTRAINT=/src/constraints.txt" in lines
    assert any("-c /constraints.txt macvtapdp" in line for line in lines)
    pinned = [
        line.split("==")[0].lower()
        for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#")
    ]
    for requirement in project()["dependencies"]:
        name = re.split(r"[<>=!~ ]", requirement, maxsplit=1)[0].lower()
        assert name in pinned or name.replace("-", "_") in pinned, requirement


def test_supervisorctl_finds_the_rendered_control_socket() -> None:
    options = ClientOptions()
    options.realize(args=["-c", str(ROOT / "etc" / "supervisord.conf")])
    assert options.serverurl == Layout(settings.DEFAULT_RUN_DIR).server_url


def test_image_version_is_the_project_version() -> None:
    version = project()["version"]
    assert plugin_container()["image"].rsplit(":", 1)[1] == version
    label = f'org.opencontainers.image.version="{version}"'
    assert label in CONTAINERFILE.read_text(encoding="utf-8")
