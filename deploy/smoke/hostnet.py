"""Rewrite deploy/docker-compose.yml for a Docker daemon without bridge networking.

deploy/smoke.sh runs where dockerd starts only with `--bridge=none --iptables=false`: containers
get the host's network, so there is no compose DNS and no port publishing. This keeps every
service, command, health check and dependency of the real file and changes only the wiring:
`network_mode: host`, service names mapped to 127.0.0.1 in /etc/hosts, published ports dropped,
Redis moved off a port the host may already use, and a Prometheus config with static targets
(its DNS discovery does not read /etc/hosts).

    python deploy/smoke/hostnet.py OUT_DIR [--redis-port 16379] [--without grafana]
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent.parent


def hostnet_compose(compose: dict, redis_port: int, prometheus_config: Path,
                    without: set[str]) -> dict:
    out = copy.deepcopy(compose)
    services = {name: spec for name, spec in out["services"].items() if name not in without}
    hosts = [f"{name}:127.0.0.1" for name in services]
    for spec in services.values():
        spec.pop("ports", None)
        spec.pop("build", None)  # smoke.sh builds the images itself from a filtered context
        spec["network_mode"] = "host"
        spec["extra_hosts"] = hosts
        spec["depends_on"] = {dep: cond for dep, cond in spec.get("depends_on", {}).items()
                              if dep not in without}
        env = spec.get("environment", {})
        if "OONA_REDIS_URL" in env:
            env["OONA_REDIS_URL"] = f"redis://redis:{redis_port}/0"
        spec["volumes"] = [_absolute(v) for v in spec.get("volumes", [])]
    redis = services["redis"]
    redis["command"] = [*redis["command"], "--port", str(redis_port), "--bind", "127.0.0.1"]
    redis["healthcheck"]["test"] = ["CMD", "redis-cli", "-p", str(redis_port), "ping"]
    prometheus = services["prometheus"]
    prometheus["volumes"] = [f"{prometheus_config}:/etc/prometheus/prometheus.yml:ro"
                             if v.endswith(":/etc/prometheus/prometheus.yml:ro") else v
                             for v in prometheus["volumes"]]
    out["services"] = services
    return out


def static_prometheus(config: dict, ports: dict[str, int]) -> dict:
    """The same scrape jobs, each pointing at 127.0.0.1:<the service's HTTP port>."""
    out = copy.deepcopy(config)
    for job in out["scrape_configs"]:
        if job["job_name"] in ports:
            job.pop("dns_sd_configs", None)
            job["static_configs"] = [{"targets": [f"127.0.0.1:{ports[job['job_name']]}"]}]
    return out


def _absolute(volume: str) -> str:
    source, _, rest = volume.partition(":")
    if source.startswith("."):
        source = str((DEPLOY / source).resolve())
    return f"{source}:{rest}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--redis-port", type=int, default=16379)
    p.add_argument("--without", action="append", default=[], help="a service to leave out")
    args = p.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    ports = {name: int(spec["environment"][f"{name.upper()}_HTTP_PORT"])
             for name, spec in compose["services"].items()
             if f"{name.upper()}_HTTP_PORT" in spec.get("environment", {})}
    prometheus_config = (args.out_dir / "prometheus.yml").resolve()
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    prometheus["rule_files"] = ["/etc/prometheus/alerts.yml"]
    prometheus_config.write_text(yaml.safe_dump(static_prometheus(prometheus, ports)))
    rewritten = hostnet_compose(compose, args.redis_port, prometheus_config, set(args.without))
    (args.out_dir / "docker-compose.yml").write_text(yaml.safe_dump(rewritten, sort_keys=False))
    print(args.out_dir / "docker-compose.yml")


if __name__ == "__main__":
    main()
