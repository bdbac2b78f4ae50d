"""deploy/docker-compose.yml (and the GPU override, the Dockerfile, the smoke rewrite) agree with
the services they run: commands are the real CLIs, every environment variable is one the service
reads, ports line up across health checks, scrape targets and addresses, start order follows
health checks. `docker compose config` validates the files when a compose CLI is installed."""

from __future__ import annotations

import importlib.util
import inspect
import re
import shutil
import subprocess
import sys
from pathlib import Path

import oona.settings
import pytest
from karn.settings import KarnSettings
from tamiyo.settings import TamiyoSettings

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to parse the compose file")

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
FLEET = ("karn", "tamiyo", "kasmina")
_DEFAULT = re.compile(r"\$\{(\w+):-([^}]*)\}")


def _load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def _resolved(env: dict) -> dict[str, str]:
    """The environment as compose would pass it with no variables set: ${VAR:-x} -> x."""
    return {k: _DEFAULT.sub(lambda m: m.group(2), str(v)) for k, v in env.items()}


@pytest.fixture(scope="module")
def compose() -> dict:
    return _load("docker-compose.yml")


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    return compose["services"]


def test_services_health_checks_and_restart_policies(services: dict) -> None:
    assert set(services) == {"redis", *FLEET, "prometheus", "grafana"}
    for name, spec in services.items():
        assert spec.get("healthcheck", {}).get("test"), f"{name} has no health check"
        assert spec.get("restart") in ("unless-stopped", "always"), name


def test_start_order_waits_for_health(services: dict) -> None:
    for name, spec in services.items():
        for dependency, condition in spec.get("depends_on", {}).items():
            assert condition == {"condition": "service_healthy"}, (name, dependency)
            assert dependency in services, (name, dependency)
    for name in FLEET:
        assert "redis" in services[name]["depends_on"], name
    assert "karn" in services["tamiyo"]["depends_on"]  # Tamiyo asks Karn for blueprints
    # A cycle would deadlock `up`: walk the graph from every service.
    def walk(name: str, seen: tuple[str, ...]) -> None:
        assert name not in seen, f"depends_on cycle {seen + (name,)}"
        for dependency in services[name].get("depends_on", {}):
            walk(dependency, seen + (name,))
    for name in services:
        walk(name, ())


def test_redis_persists_streams_on_a_named_volume(compose: dict, services: dict) -> None:
    command = services["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert f"redis-data:{command[command.index('--dir') + 1]}" in services["redis"]["volumes"]
    for name, spec in services.items():
        for volume in spec.get("volumes", []):
            source = volume.split(":")[0]
            assert source.startswith(".") or source in compose["volumes"], (name, volume)
            if source.startswith("."):
                assert (DEPLOY / source).exists(), (name, volume)


def test_only_operator_ports_are_published_on_loopback(services: dict) -> None:
    published = {name for name, spec in services.items() if spec.get("ports")}
    assert published == {"kasmina", "prometheus", "grafana"}
    for name in published:
        for port in services[name]["ports"]:
            assert _DEFAULT.sub(r"\2", port).startswith("127.0.0.1:"), (name, port)


def test_commands_are_the_real_clis(services: dict) -> None:
    for name in ("karn", "tamiyo"):
        assert services[name]["command"] == ["python", "-m", name]
        assert importlib.util.find_spec(f"{name}.__main__"), name
    assert services["kasmina"]["command"] == ["python", "-m", "kasmina", "serve"]
    usage = subprocess.run([sys.executable, "-m", "kasmina", "--help"], capture_output=True,
                           text=True, timeout=120, check=True).stdout
    assert re.search(r"^\s+serve\s", usage, re.MULTILINE), usage


def _bus_variables() -> set[str]:
    return set(re.findall(r"OONA_\w+", inspect.getsource(oona.settings)))


def _kasmina_variables() -> set[str]:
    spec = importlib.util.find_spec("kasmina")
    source = (Path(spec.origin).parent / "service" / "main.py").read_text()
    return set(re.findall(r"environ\.get\(\"(KASMINA_\w+)\"", source))


def test_environment_names_are_read_by_the_services(services: dict) -> None:
    known = {
        "karn": {f"KARN_{f.upper()}" for f in KarnSettings.__dataclass_fields__},
        "tamiyo": {f"TAMIYO_{f.upper()}" for f in TamiyoSettings.__dataclass_fields__},
        "kasmina": _kasmina_variables(),
    }
    assert {"KASMINA_BIND_HOST", "KASMINA_GRPC_PORT"} <= known["kasmina"]
    for name in FLEET:
        env = services[name]["environment"]
        unknown = set(env) - known[name] - _bus_variables()
        assert not unknown, f"{name}: variables no code reads: {sorted(unknown)}"
        assert env["OONA_REDIS_URL"] == "redis://redis:6379/0"
        assert env[f"{name.upper()}_BIND_HOST"] == "0.0.0.0"  # reachable from other containers


def test_settings_parse_and_ports_line_up(services: dict) -> None:
    karn = KarnSettings.from_env(_resolved(services["karn"]["environment"]))
    tamiyo = TamiyoSettings.from_env(_resolved(services["tamiyo"]["environment"]))
    kasmina = _resolved(services["kasmina"]["environment"])
    http = {"karn": karn.http_port, "tamiyo": tamiyo.http_port,
            "kasmina": int(kasmina["KASMINA_HTTP_PORT"])}
    assert karn.database_url.startswith("sqlite:////var/lib/fleet/karn/")
    assert "karn-data:/var/lib/fleet/karn" in services["karn"]["volumes"]
    assert tamiyo.karn_address == f"karn:{karn.grpc_port}"
    assert services["kasmina"]["ports"][0].endswith(f":{kasmina['KASMINA_GRPC_PORT']}")
    for name, port in http.items():
        assert f"http://127.0.0.1:{port}/readyz" in " ".join(services[name]["healthcheck"]["test"])
    scrape = {job["job_name"]: job for job in
              yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
              ["scrape_configs"]}
    for name, port in http.items():
        job = scrape[name]
        targets = [t for c in job.get("static_configs", []) for t in c["targets"]]
        targets += [f"{n}:{c['port']}" for c in job.get("dns_sd_configs", []) for n in c["names"]]
        assert targets == [f"{name}:{port}"], (name, targets)


def test_dockerfile_targets_match_compose(services: dict) -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert dockerfile.lstrip().startswith("#")
    assert re.search(r"^ARG BASE_IMAGE=", dockerfile, re.MULTILINE)
    stages = dict(re.findall(r"^FROM \S+ AS (\w+)\n(.*?)(?=^FROM |\Z)", dockerfile,
                             re.MULTILINE | re.DOTALL))
    for name in FLEET:
        build = services[name]["build"]
        assert (build["context"], build["dockerfile"], build["target"]) == \
            ("..", "deploy/Dockerfile", name)
        assert "BASE_IMAGE" in build["args"]
        stage = stages[name]
        assert re.search(r"^USER fleet$", stage, re.MULTILINE), f"{name} runs as root"
        cmd = re.search(r"^CMD (.+)$", stage, re.MULTILINE).group(1)
        assert yaml.safe_load(cmd) == services[name]["command"], name
        assert ("pip install \"$wheel\"" in stage) == (name == "kasmina")
        assert ("find_spec('torch') is None" in stage) == (name != "kasmina")


def test_gpu_override_reserves_a_gpu_for_the_runtime_only() -> None:
    override = _load("docker-compose.gpu.yml")["services"]
    assert set(override) == {"kasmina"}
    devices = override["kasmina"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and devices[0]["count"] == 1
    assert override["kasmina"]["build"]["args"]["TORCH_SOURCE"] == "index"


def test_smoke_rewrite_keeps_services_and_moves_wiring(compose: dict, tmp_path: Path) -> None:
    sys.path.insert(0, str(DEPLOY / "smoke"))
    try:
        import hostnet
    finally:
        sys.path.remove(str(DEPLOY / "smoke"))
    out = hostnet.hostnet_compose(compose, 16379, tmp_path / "p.yml", {"grafana"})["services"]
    assert set(out) == set(compose["services"]) - {"grafana"}
    for name, spec in out.items():
        assert spec["network_mode"] == "host" and "ports" not in spec, name
        assert "grafana" not in spec.get("depends_on", {})
        if name != "redis":
            assert spec["command"] == compose["services"][name].get("command"), name
            assert spec["healthcheck"] == compose["services"][name]["healthcheck"], name
    assert out["karn"]["environment"]["OONA_REDIS_URL"] == "redis://redis:16379/0"
    assert out["redis"]["healthcheck"]["test"][-3:] == ["-p", "16379", "ping"]


def _compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True,
                                 timeout=30, check=False).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


@pytest.mark.parametrize("files", [["docker-compose.yml"],
                                   ["docker-compose.yml", "docker-compose.gpu.yml"]])
def test_docker_compose_config_accepts_the_files(files: list[str]) -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no `docker compose` or `docker-compose` CLI installed; the YAML checks above "
                    "still ran")
    args = [a for f in files for a in ("-f", str(DEPLOY / f))]
    result = subprocess.run([*cli, *args, "config", "--quiet"], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
