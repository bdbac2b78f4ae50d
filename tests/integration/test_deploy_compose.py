"""deploy/docker-compose.yml (and the GPU override, the Dockerfiles, the pins, the Makefile) agree
with the services they run: commands are the real CLIs, every environment variable is one the
service reads, ports line up across health checks, scrape targets and addresses, start order
follows health checks and leaves monitoring independent of the fleet, every container is bounded
(memory, logs) and read-only where it can be, and nothing has a default password. `docker compose
config` validates the files when a compose CLI is installed."""

from __future__ import annotations

import importlib.util
import inspect
import re
import shutil
import subprocess
import sys
import tomllib
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
    """The environment as compose would pass it with no variables set: ${VAR:-x} -> x; the
    secrets' *_FILE paths (inside the containers) left out."""
    return {k: _DEFAULT.sub(lambda m: m.group(2), str(v)) for k, v in env.items()
            if not k.endswith("_FILE")}


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


def test_monitoring_does_not_wait_for_the_fleet(services: dict) -> None:
    # Prometheus must be up exactly while a fleet service crash-loops, so it waits for nothing.
    assert "depends_on" not in services["prometheus"]
    assert set(services["grafana"]["depends_on"]) == {"prometheus"}


def test_redis_persists_streams_on_a_named_volume(compose: dict, services: dict) -> None:
    command = services["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    # Other containers reach Redis over the compose network, not its loopback: protected mode
    # (on by default without a password) would refuse them all.
    assert command[command.index("--protected-mode") + 1] == "no"
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
    """`KASMINA_*` names the service code reads: quoted in kasmina/service/ (settings or main)."""
    spec = importlib.util.find_spec("kasmina")
    sources = (Path(spec.origin).parent / "service").glob("*.py")
    return {name for path in sources for name in re.findall(r"\"(KASMINA_\w+)\"", path.read_text())}


def test_environment_names_are_read_by_the_services(services: dict) -> None:
    known = {
        "karn": {f"KARN_{f.upper()}" for f in KarnSettings.__dataclass_fields__},
        "tamiyo": {f"TAMIYO_{f.upper()}" for f in TamiyoSettings.__dataclass_fields__},
        "kasmina": _kasmina_variables(),
    }
    # Secrets come as files (oona.settings.read_secret reads NAME or NAME_FILE).
    known["karn"].add("KARN_API_TOKEN_FILE")
    known["tamiyo"] |= {"TAMIYO_API_TOKEN_FILE", "KARN_API_TOKEN_FILE"}
    known["kasmina"].add("KASMINA_API_TOKEN_FILE")
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


def _stages(dockerfile: str) -> dict[str, str]:
    return dict(re.findall(r"^FROM \S+ AS ([\w-]+)\n(.*?)(?=^FROM |\Z)", dockerfile,
                           re.MULTILINE | re.DOTALL))


def test_dockerfile_targets_match_compose(services: dict) -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert dockerfile.lstrip().startswith("#")
    assert re.search(r"^ARG BASE_IMAGE=", dockerfile, re.MULTILINE)
    stages = _stages(dockerfile)
    for name in FLEET:
        build = services[name]["build"]
        assert (build["context"], build["dockerfile"], build["target"]) == \
            ("..", "deploy/Dockerfile", name)
        assert "BASE_IMAGE" in build["args"]
        stage = stages[name]
        assert re.search(r"^USER fleet$", stage, re.MULTILINE), f"{name} runs as root"
        cmd = re.search(r"^CMD (.+)$", stage, re.MULTILINE).group(1)
        assert yaml.safe_load(cmd) == services[name]["command"], name
        assert ("find_spec('torch') is None" in stage) == (name != "kasmina")
    # The runtime's torch wheel and sources stay in the build stage: the image takes /opt/venv
    # only, so no lower layer carries a file a later one deleted.
    assert "pip install \"$wheel\"" in stages["kasmina-build"]
    final = [line for line in stages["kasmina"].splitlines()
             if line.startswith(("COPY", "RUN", "ADD"))]
    assert final == ["COPY --from=kasmina-build /opt/venv /opt/venv"]
    assert stages["kasmina"].rstrip().endswith(final[0])  # vfs: nothing commits a copy after it
    # ... onto a stage with no venv of its own (else the bus library would be in it twice).
    assert "FROM system AS kasmina\n" in dockerfile
    assert "python3 -m venv" not in stages["system"] and "COPY --from" not in stages["system"]
    # The CPU image has no Triton (1 GB, useless without a GPU); the GPU override adds it.
    extras = re.search(r"^ARG KASMINA_EXTRAS=(\S+)$", stages["kasmina-build"], re.MULTILINE)
    assert extras and "triton" not in extras.group(1).split(",")


def test_builds_work_without_a_bridge_network(services: dict) -> None:
    # The documented daemon runs with --bridge=none: a build on the default network has none.
    build_sh = (DEPLOY / "build.sh").read_text()
    assert "docker build --network host" in build_sh
    for name, spec in services.items():
        if "build" in spec:
            assert spec["build"]["network"] == "host", name
    tools = _stages((DEPLOY / "tools" / "Dockerfile").read_text())
    for name in ("redis", "prometheus"):
        assert services[name]["build"]["target"] in tools, name
        assert services[name]["build"]["context"] == "./tools", name
        # The image compose starts is the one deploy/build.sh tags.
        image = _DEFAULT.sub(r"\2", services[name]["image"])
        assert f"-t {image} deploy/tools" in build_sh, (name, image)


def test_python_packages_are_pinned() -> None:
    pins = [line for line in (DEPLOY / "constraints.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    assert pins and all(re.fullmatch(r"[A-Za-z0-9_.-]+==[\w.]+", p) for p in pins), pins
    names = {p.split("==")[0].lower() for p in pins}
    assert {"torch", "grpcio", "fastapi", "sqlalchemy", "scikit-learn", "redis"} <= names
    assert "triton" not in names  # the GPU build's: torch==2.13.0 pins its own
    assert "torch==2.13.0" in pins
    # Every direct dependency of what the images install (the bus, Karn, Tamiyo, the runtime
    # with its fleet extra and the recipe's packages) has a pin.
    services = DEPLOY.parent / "services"
    wanted = ["scikit-learn", "tqdm"]
    for name in ("oona-bus", "karn-feedback", "tamiyo-controller", "kasmina-runtime"):
        project = tomllib.loads((services / name / "pyproject.toml").read_text())["project"]
        wanted += project["dependencies"]
        if name == "kasmina-runtime":
            wanted += project["optional-dependencies"]["fleet"]
    direct = {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in wanted}
    unpinned = direct - {n.replace("_", "-") for n in names} - {"oona-bus"}
    assert not unpinned, f"add to deploy/constraints.txt: {sorted(unpinned)}"
    requirements = (DEPLOY.parent / "requirements.txt").read_text()
    assert re.search(r"^torch==2\.13\.0$", requirements, re.MULTILINE)  # the same torch
    assert "PIP_CONSTRAINT=/etc/fleet/constraints.txt" in (DEPLOY / "Dockerfile").read_text()


def test_every_container_is_bounded_and_read_only_where_it_can_be(services: dict) -> None:
    for name, spec in services.items():
        assert re.fullmatch(r"\d+[mg]", _DEFAULT.sub(r"\2", spec["mem_limit"])), name
        logging = spec["logging"]
        assert logging["driver"] == "json-file" and logging["options"]["max-size"], name
        if name != "grafana":  # Grafana writes plugins and caches outside its data volume
            assert spec["read_only"] is True, name
    for name in FLEET:
        assert services[name]["tmpfs"] == ["/tmp"], name


def test_the_fleet_runs_signed_and_authenticated_from_compose_secrets(compose: dict,
                                                                      services: dict) -> None:
    tokens = {"karn": {"karn_api_token"}, "tamiyo": {"tamiyo_api_token", "karn_api_token"},
              "kasmina": {"kasmina_api_token"}}
    for name, mine in tokens.items():
        env, secrets = services[name]["environment"], set(services[name]["secrets"])
        assert secrets == {"oona_signing_key", "oona_signing_previous_keys",
                           f"redis_{name}_password", *mine}, name
        assert env["OONA_SIGNING_KEY_FILE"] == "/run/secrets/oona_signing_key", name
        assert "OONA_SIGNING_KEY" not in env, name  # a key never sits in a variable
        for token in mine:
            variable = token.upper() + "_FILE"
            assert env[variable] == f"/run/secrets/{token}", (name, variable)
    for secret in ("oona_signing_key", "kasmina_api_token", "karn_api_token",
                   "tamiyo_api_token"):
        assert _DEFAULT.sub(r"\2", compose["secrets"][secret]["file"]) == f"./secrets/{secret}"
    assert "for name in oona_signing_key" in (DEPLOY / "up.sh").read_text()  # made if missing


def test_grafana_has_no_default_password(compose: dict, services: dict) -> None:
    env = services["grafana"]["environment"]
    assert "GF_SECURITY_ADMIN_PASSWORD" not in env
    assert env["GF_SECURITY_ADMIN_PASSWORD__FILE"] == "/run/secrets/grafana_admin_password"
    assert services["grafana"]["secrets"] == ["grafana_admin_password"]
    secret = _DEFAULT.sub(r"\2", compose["secrets"]["grafana_admin_password"]["file"])
    assert secret == "./secrets/grafana_admin_password"
    assert (DEPLOY / "secrets" / ".gitignore").read_text().startswith("*\n")
    # Not built here (no Debian package): started only with its profile (deploy/up.sh).
    assert services["grafana"]["profiles"] == ["grafana"]
    assert "ADMIN_PASSWORD:-" not in (DEPLOY / "docker-compose.yml").read_text()


def test_gpu_override_reserves_a_gpu_for_the_runtime_only() -> None:
    override = _load("docker-compose.gpu.yml")["services"]
    assert set(override) == {"kasmina"}
    devices = override["kasmina"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and devices[0]["count"] == 1
    args = override["kasmina"]["build"]["args"]
    assert args["TORCH_SOURCE"] == "index"
    assert "triton" in args["KASMINA_EXTRAS"].split(",")
    # deploy/build.sh builds the same image for GPU=1.
    assert override["kasmina"]["image"].startswith("${IMAGE_PREFIX:-kasmina}/kasmina-cuda:")
    assert "KASMINA_EXTRAS=" + args["KASMINA_EXTRAS"] in (DEPLOY / "build.sh").read_text()


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


@pytest.mark.parametrize("found, expected", [
    ("docker", "docker compose -f deploy/docker-compose.yml"),
    ("docker-compose", "docker-compose -f deploy/docker-compose.yml"),
])
def test_make_down_uses_the_compose_cli_that_exists(tmp_path: Path, found: str,
                                                    expected: str) -> None:
    """The Makefile finds `docker compose` (v2) or else `docker-compose` (v1, Debian's): a stub
    `docker` answers `compose version` only when v2 is the one "installed"."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    status = 0 if found == "docker" else 1
    (tmp_path / "docker").write_text(f"#!/bin/sh\nexit {status}\n")
    (tmp_path / "docker").chmod(0o755)
    result = subprocess.run([make, "-n", "down"], cwd=DEPLOY.parent, capture_output=True,
                            text=True, timeout=30, check=True,
                            env={"PATH": f"{tmp_path}:/usr/bin:/bin"})
    assert result.stdout.strip().startswith(expected), result.stdout
    assert "down --remove-orphans" in result.stdout
