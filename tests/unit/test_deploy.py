"""The deployment files are valid and agree with the services' real settings and ports."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from ragline.config import GLOBAL_ENV, build_parser
from services.api.settings import ApiSettings
from services.embed.settings import EmbedSettings
from services.generate.settings import GenerateSettings
from services.retrieve.settings import RetrieveSettings

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = {"embed": EmbedSettings, "retrieve": RetrieveSettings,
            "generate": GenerateSettings, "api": ApiSettings}  # fmt: skip
STAGE_PORT = {"embed": 50051, "retrieve": 50052, "generate": 50053, "api": 8080}
COMPOSE_BIN = Path(os.environ.get("RAGLINE_COMPOSE_BIN", ROOT / ".venv-deploy/bin/docker-compose"))
K8S = sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def k8s_docs() -> list[dict]:
    return [d for path in K8S for d in yaml.safe_load_all(path.read_text()) if d]


def network_aliases(services: dict) -> set[str]:
    return {
        alias
        for svc in services.values()
        for alias in (svc.get("networks") or {}).get("default", {}).get("aliases", [])
    }


def flags(cls) -> set[str]:
    return {opt for action in build_parser(cls)._actions for opt in action.option_strings}


def flag_value(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


def check_env(names, where: str) -> None:
    for name in names:
        if not name.startswith("RAGLINE_") or name in GLOBAL_ENV:
            continue
        owner = next(
            (c for c in SETTINGS.values() if name.startswith(c.model_config["env_prefix"])), None
        )
        assert owner is not None, f"{where}: {name} belongs to no service"
        field = name.removeprefix(owner.model_config["env_prefix"]).lower()
        assert field in owner.model_fields, f"{where}: {name} is not a setting of {owner.__name__}"


def check_command(args: list[str], where: str) -> str:
    stage = args[0]
    assert stage in SETTINGS, f"{where}: unknown stage command {stage!r}"
    known = flags(SETTINGS[stage])
    for arg in args[1:]:
        if arg.startswith("--"):
            assert arg.split("=")[0] in known, f"{where}: {stage} has no flag {arg}"
    assert flag_value(args, "--port") == str(STAGE_PORT[stage]), f"{where}: port"
    return stage


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_compose_file_is_valid(profile) -> None:
    if not COMPOSE_BIN.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{COMPOSE_BIN} missing: `make install-test` installs it")
        pytest.skip("docker-compose validator not installed (make install-test)")
    result = subprocess.run(
        [str(COMPOSE_BIN), "-f", str(ROOT / "docker-compose.yml"), "--profile", profile,
         "config", "-q"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_kubernetes_manifests_are_valid() -> None:
    import kubernetes_validate

    assert {p.name for p in K8S} >= {"api.yaml", "embed.yaml", "retrieve.yaml", "generate.yaml"}
    for doc in k8s_docs():
        kubernetes_validate.validate(doc, "1.30.0", strict=True)


def test_compose_commands_env_ports_and_health_match_the_services() -> None:
    services = compose()["services"]
    names = set(services)
    aliases = network_aliases(services)
    stages_seen = set()
    for name, svc in services.items():
        check_env((svc.get("environment") or {}).keys(), name)
        if not str(svc.get("image", "")).startswith("ragline:"):
            continue
        args = [str(a) for a in svc["command"]]
        stage = check_command(args, name)
        stages_seen.add(stage)
        health = " ".join(str(t) for t in svc["healthcheck"]["test"])
        assert f"127.0.0.1:{STAGE_PORT[stage]}" in health, f"{name}: health check port"
        if stage != "api":
            assert f"ragline.v1.{stage.capitalize()}" in health
            assert flag_value(args, "--metrics-port") == "9100"
            continue
        for flag, target in (("--embed-address", "embed"), ("--retrieve-address", "retrieve"),
                             ("--retrieve-write-address", "retrieve"),
                             ("--generate-address", "generate")):  # fmt: skip
            host, port = re.sub(r"^dns:///", "", flag_value(args, flag)).rsplit(":", 1)
            assert host in names | aliases, f"{name}: {flag} points at unknown {host}"
            assert int(port) == STAGE_PORT[target], f"{name}: {flag} port"
    assert stages_seen == set(SETTINGS)
    assert services["embed"]["deploy"]["replicas"] == 2
    pinned = [s["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
              for s in services.values() if str(s.get("image")) == "ragline:gpu"]  # fmt: skip
    assert sorted(pinned) == [["0"], ["1"]], "one generate service per GPU, each pinned"


def test_nginx_and_prometheus_point_at_real_services_and_ports() -> None:
    services = compose()["services"]
    conf = (ROOT / "deploy" / "nginx" / "nginx.conf").read_text()
    upstreams = re.findall(r"server\s+([\w-]+):(\d+)\s+max_fails=3 fail_timeout=30s", conf)
    assert upstreams and "least_conn" in conf
    for host, port in upstreams:
        assert host in services and int(port) == STAGE_PORT["api"]
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    aliases = network_aliases(services)
    for job in prom["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            assert sd["port"] == 9100
            assert set(sd["names"]) <= set(services) | aliases
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.split(":")
                assert host in services and int(port) == STAGE_PORT["api"]


def test_kubernetes_args_env_probes_and_services_agree() -> None:
    docs = k8s_docs()
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    for doc in docs:
        if doc["kind"] == "ConfigMap":
            check_env(doc["data"].keys(), doc["metadata"]["name"])
        if doc["kind"] != "Deployment":
            continue
        name = doc["metadata"]["name"]
        pod = doc["spec"]["template"]["spec"]
        container = pod["containers"][0]
        stage = check_command([str(a) for a in container["args"]], name)
        check_env([e["name"] for e in container.get("env", [])], name)
        port = STAGE_PORT[stage]
        assert port in [p["containerPort"] for p in container["ports"]]
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            if probe in container:
                spec = container[probe].get("grpc") or container[probe].get("httpGet")
                assert spec["port"] == port, f"{name}: {probe} port"
        service = services[name]
        assert any(p["targetPort"] == port for p in service["spec"]["ports"]), name
        labels = doc["spec"]["template"]["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items()), name
        if stage == "generate":
            assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
            assert pod["nodeSelector"]
        if stage == "api":
            for arg in container["args"]:
                if ":" in arg and not arg.startswith("--") and arg != "0.0.0.0":
                    host = re.sub(r"^dns:///", "", arg).rsplit(":", 1)[0]
                    assert host in services, f"api points at unknown Service {host}"
    for stage in ("embed", "retrieve-reader", "generate"):
        assert services[stage]["spec"].get("clusterIP") == "None", f"{stage} must be headless"
    hpas = {
        d["spec"]["scaleTargetRef"]["name"] for d in docs if d["kind"] == "HorizontalPodAutoscaler"
    }  # noqa: E501
    assert hpas == {"embed", "api"}
