"""The deployment files are valid and agree with the services' real settings and ports."""

from __future__ import annotations

import os
import re
import subprocess
import sys
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
DOCKER = ROOT / "deploy" / "docker"
COMPOSE_BIN = Path(os.environ.get("RAGLINE_COMPOSE_BIN", ROOT / ".venv-deploy/bin/docker-compose"))
K8S = sorted(p for p in (ROOT / "deploy" / "k8s").glob("*.yaml") if p.name != "kustomization.yaml")
REGISTRY = "registry.example.com"  # the manifests' placeholder; kustomization.yaml sets it
# Variables of the deployment files themselves, not settings of a service.
DEPLOY_ENV = {"RAGLINE_GPUS"}


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
        if not name.startswith("RAGLINE_") or name in GLOBAL_ENV or name in DEPLOY_ENV:
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


def test_compose_gpu_profile_runs_one_pinned_generate_per_gpu_without_a_fixed_count() -> None:
    services = compose()["services"]
    gpu = [name for name, s in services.items() if str(s.get("image")) == "ragline:gpu"]
    assert gpu == ["generate-gpu"], "one service, scaled to the GPUs"
    svc = services["generate-gpu"]
    assert svc["deploy"]["replicas"] == "${RAGLINE_GPUS:-1}"
    assert svc["environment"]["RAGLINE_GPUS"] == "${RAGLINE_GPUS:-1}", "the claim script's count"
    (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
    assert device["count"] == "all" and "device_ids" not in device
    # each replica claims its own GPU; the locks live in a volume every replica mounts
    assert svc["entrypoint"] == ["ragline-claim-gpu", "ragline"]
    assert "gpu-locks:/run/ragline-gpus" in svc["volumes"]
    assert "gpu-locks" in compose()["volumes"]
    assert "RAGLINE_GPU_LOCK_DIR:-/run/ragline-gpus" in (DOCKER / "claim-gpu.sh").read_text()


def test_the_gpu_claim_gives_each_replica_its_own_gpu_and_refuses_one_too_many(tmp_path) -> None:
    import time

    env = {**os.environ, "RAGLINE_GPUS": "2", "RAGLINE_GPU_LOCK_DIR": str(tmp_path)}
    script = str(DOCKER / "claim-gpu.sh")
    show = ["sh", "-c", "echo $CUDA_VISIBLE_DEVICES $RAGLINE_GENERATE_GPU; sleep 3"]
    first = subprocess.Popen([script, *show], env=env, stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    second = subprocess.Popen([script, *show], env=env, stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    third = subprocess.run([script, "true"], env=env, capture_output=True, text=True, timeout=10)
    assert third.returncode == 1 and "all 2 GPUs are held" in third.stderr
    assert first.communicate(timeout=10)[0].split() == ["0", "0"]
    assert second.communicate(timeout=10)[0].split() == ["1", "0"]
    # the holders exited: their GPUs are free again
    again = subprocess.run([script, *show[:2], "echo $CUDA_VISIBLE_DEVICES"], env=env,
                           capture_output=True, text=True, timeout=10)  # fmt: skip
    assert again.stdout.split() == ["0"]


def test_compose_wires_redis_to_every_edge() -> None:
    services = compose()["services"]
    edges = {n: s for n, s in services.items() if s.get("command", [None])[0] == "api"}
    assert len(edges) == 2
    for name, svc in edges.items():
        url = svc["environment"]["RAGLINE_API_REDIS_URL"]
        host, port = re.fullmatch(r"redis://([\w-]+):(\d+)/\d+", url).groups()
        assert host in services and port == "6379", url
        assert host in svc["depends_on"], f"{name} starts after {host}"
        assert svc["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317"
    assert "redis_url" in ApiSettings.model_fields


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
        if not container["image"].startswith(f"{REGISTRY}/ragline:"):
            continue  # the OpenTelemetry Collector
        stage = check_command([str(a) for a in container["args"]], name)
        check_env([e["name"] for e in container.get("env", [])], name)
        port = STAGE_PORT[stage]
        assert port in [p["containerPort"] for p in container["ports"]]
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            if probe in container:
                spec = next(container[probe][k] for k in ("grpc", "httpGet", "tcpSocket")
                            if k in container[probe])  # fmt: skip
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
    for stage in ("embed", "retrieve", "generate"):
        assert services[stage]["spec"].get("clusterIP") == "None", f"{stage} must be headless"
    hpas = {
        d["spec"]["scaleTargetRef"]["name"] for d in docs if d["kind"] == "HorizontalPodAutoscaler"
    }  # noqa: E501
    assert hpas == {"embed", "api"}


def deployments() -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in k8s_docs() if d["kind"] == "Deployment"}


def test_kubernetes_liveness_never_asks_for_the_health_status() -> None:
    # A stage's gRPC health is NOT_SERVING during warm-up and drain (ragline/grpc_server.py):
    # a liveness or startup probe on it restarts pods that are loading a model. Liveness is
    # "accepting connections" (the port is bound before warm-up) or the edge's /livez.
    for name, doc in deployments().items():
        for container in doc["spec"]["template"]["spec"]["containers"]:
            for probe in ("livenessProbe", "startupProbe"):
                spec = container.get(probe)
                if spec is None:
                    continue
                assert "grpc" not in spec, f"{name}: {probe} uses the gRPC health status"
                if "httpGet" in spec:
                    assert spec["httpGet"]["path"] == "/livez", f"{name}: {probe}"
                else:
                    assert "tcpSocket" in spec, f"{name}: {probe}"
            assert "livenessProbe" in container, name
            ready = container.get("readinessProbe", {})
            if "grpc" in ready:  # readiness is the one that follows the stage's health
                assert ready["grpc"]["service"].startswith("ragline.v1."), name


def test_kubernetes_images_name_the_registry_placeholder_kustomize_sets() -> None:
    kust = yaml.safe_load((ROOT / "deploy" / "k8s" / "kustomization.yaml").read_text())
    assert sorted(kust["resources"]) == sorted(p.name for p in K8S), "every manifest applied"
    (entry,) = kust["images"]
    assert entry["name"] == f"{REGISTRY}/ragline" and entry["newName"]
    images = [c["image"] for d in k8s_docs() if d["kind"] in ("Deployment", "Job")
              for c in [*d["spec"]["template"]["spec"]["containers"],
                        *d["spec"]["template"]["spec"].get("initContainers", [])]]  # fmt: skip
    ours = [i for i in images if "ragline" in i]
    assert ours and all(re.fullmatch(rf"{REGISTRY}/ragline:(cpu|gpu)", i) for i in ours), ours
    assert set(images) - set(ours) == {"otel/opentelemetry-collector:0.111.0"}


def models_job() -> dict:
    (job,) = [d for d in k8s_docs() if d["kind"] == "Job"]
    return job


def test_a_job_fills_the_models_volume_that_generate_waits_for() -> None:
    docs = k8s_docs()
    claims = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}
    pod = deployments()["generate"]["spec"]["template"]["spec"]
    claim = next(v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                 if v["name"] == "models")  # fmt: skip
    job_pod = models_job()["spec"]["template"]["spec"]
    (job_volume,) = job_pod["volumes"]
    assert job_volume["persistentVolumeClaim"]["claimName"] == claim
    assert not job_volume["persistentVolumeClaim"].get("readOnly")
    (download,) = job_pod["containers"]
    assert download["volumeMounts"] == [{"name": "models", "mountPath": "/models"}]
    assert "ReadWriteMany" in claims[claim]["spec"]["accessModes"], "one writer, many readers"
    (wait,) = pod["initContainers"]
    assert "/models/llm/.complete" in " ".join(wait["command"])
    assert "/models/llm" in pod["containers"][0]["args"]


def test_the_models_job_downloads_once_and_renames_into_place(tmp_path) -> None:
    (download,) = models_job()["spec"]["template"]["spec"]["containers"]
    script = download["args"][0]
    env = {e["name"]: e.get("value", "") for e in download["env"] if "value" in e}
    assert env["LLM_REPO"] and download["command"] == ["python", "-c"]
    fake = tmp_path / "site" / "huggingface_hub"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "import pathlib\n"
        "def snapshot_download(repo_id, revision=None, local_dir=None):\n"
        "    d = pathlib.Path(local_dir); d.mkdir(parents=True, exist_ok=True)\n"
        "    (d / 'config.json').write_text(repo_id)\n"
        "    return str(d)\n"
    )
    models = tmp_path / "models"
    models.mkdir()
    run_env = {**os.environ, **env, "MODELS_DIR": str(models),
               "PYTHONPATH": str(tmp_path / "site")}  # fmt: skip
    first = subprocess.run([sys.executable, "-c", script], env=run_env, capture_output=True,
                           text=True, timeout=30)  # fmt: skip
    assert first.returncode == 0, first.stderr
    assert (models / "llm" / "config.json").read_text() == env["LLM_REPO"]
    assert (models / "llm" / ".complete").exists() and not (models / ".llm-partial").exists()
    again = subprocess.run([sys.executable, "-c", script], env=run_env, capture_output=True,
                           text=True, timeout=30)  # fmt: skip
    assert again.returncode == 0 and "already there" in again.stdout, again.stderr


def test_telemetry_goes_to_the_collector_the_manifests_deploy() -> None:
    docs = k8s_docs()
    (config,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] ==
                 "ragline-config"]  # fmt: skip
    host, port = re.fullmatch(r"http://([\w-]+):(\d+)",
                              config["data"]["OTEL_EXPORTER_OTLP_ENDPOINT"]).groups()  # fmt: skip
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    target = next(p["targetPort"] for p in services[host]["spec"]["ports"]
                  if p["port"] == int(port))  # fmt: skip
    collector = deployments()[host]
    selector = services[host]["spec"]["selector"]
    labels = collector["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in selector.items())
    container = collector["spec"]["template"]["spec"]["containers"][0]
    assert target in [p["containerPort"] for p in container["ports"]]
    # the collector's own config receives OTLP/gRPC on that port and has a traces pipeline
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == host]
    otel = yaml.safe_load(cm["data"]["config.yaml"])
    assert otel["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"] == f"0.0.0.0:{target}"
    assert "otlp" in otel["service"]["pipelines"]["traces"]["receivers"]
    exporters = otel["service"]["pipelines"]["traces"]["exporters"]
    assert exporters and set(exporters) <= set(otel["exporters"])
    mount = container["volumeMounts"][0]["mountPath"]
    assert container["args"] == [f"--config={mount}/config.yaml"]


# --- the images: what their runtime stages hold ---------------------------------------------

# Libraries python:3.11-slim (debian:bookworm-slim) already has: glibc, and what its apt and
# dpkg link (libstdc++6, libgcc-s1, zlib1g).
BASE_LIBS = {"libc.so.6", "libm.so.6", "libpthread.so.0", "libdl.so.2", "librt.so.1",
             "ld-linux-x86-64.so.2", "libstdc++.so.6", "libgcc_s.so.1", "libz.so.1"}  # fmt: skip
# Debian package that provides a library the services load, for those the base lacks.
DEBIAN_LIBS = {"libgomp.so.1": "libgomp1"}


def dockerfile_stages(path: Path) -> list[dict]:
    """FROM ... AS name and the stage's instructions, continuation lines joined."""
    stages: list[dict] = []
    for line in path.read_text().replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            stages.append({"name": rest.split(" AS ")[1] if " AS " in rest else None, "ops": []})
        elif stages:
            stages[-1]["ops"].append((word.upper(), rest.strip()))
    return stages


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, capture_output=True, text=True, check=True)  # fmt: skip
    return [f for f in out.stdout.splitlines() if (ROOT / f).exists()]


def image_files(dockerfile: Path) -> set[str]:
    """The paths the final stage's COPY instructions put in the image (the venv aside)."""
    stages = dockerfile_stages(dockerfile)
    repo = tracked_files()

    def files(stage: dict) -> set[str]:
        got: set[str] = set()
        workdir = "/"
        for op, rest in stage["ops"]:
            if op == "WORKDIR":
                workdir = rest
            if op != "COPY":
                continue
            args = rest.split()
            source = args.pop(0).split("=", 1)[1] if args[0].startswith("--from=") else None
            *srcs, dst = args
            dst = dst if dst.startswith("/") else f"{workdir.rstrip('/')}/{dst}"
            for src in srcs:
                if source:
                    prefix = src.rstrip("/")
                    earlier = files(next(s for s in stages if s["name"] == source))
                    got |= {dst.rstrip("/") + p[len(prefix):] for p in earlier
                            if p == prefix or p.startswith(prefix + "/")}  # fmt: skip
                elif (ROOT / src).is_dir():
                    got |= {f"{dst.rstrip('/')}/{f[len(src.rstrip('/')) + 1:]}" for f in repo
                            if f.startswith(src.rstrip("/") + "/")}  # fmt: skip
                elif dst.endswith("/") or dst.endswith("/."):
                    got.add(f"{dst.rstrip('/.')}/{Path(src).name}")
                else:
                    got.add(dst)
        return got

    return files(stages[-1])


def needed_libraries(package_dir: Path) -> dict[str, set[str]]:
    """ELF NEEDED entries of every shared object under a package dir: {library: {needed}}."""
    out = {}
    for so in package_dir.rglob("*.so*"):
        if so.is_file() and not so.is_symlink():
            dyn = subprocess.run(["readelf", "-d", str(so)], capture_output=True, text=True)
            out[so.name] = set(re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", dyn.stdout))
    return out


def test_the_cpu_runtime_stage_installs_every_library_the_services_link() -> None:
    import shutil
    import sysconfig

    if shutil.which("readelf") is None:
        pytest.skip("readelf (binutils) not installed")
    runtime = dockerfile_stages(DOCKER / "Dockerfile")[-1]
    installs = " ".join(rest for op, rest in runtime["ops"] if op == "RUN")
    site = Path(sysconfig.get_paths()["purelib"])
    # the compiled extensions the stages load (llama.cpp, ONNX Runtime, FAISS, tokenizers, gRPC)
    packages = ["llama_cpp", "onnxruntime", "faiss", "faiss_cpu.libs", "tokenizers", "grpc",
                "numpy", "numpy.libs"]  # fmt: skip
    bundled = {so.name for p in packages for so in (site / p).rglob("*.so*")}
    missing = {}
    for package in packages:
        for lib, needed in needed_libraries(site / package).items():
            for dep in needed - bundled - BASE_LIBS:
                pkg = DEBIAN_LIBS.get(dep)
                if pkg is None or not re.search(rf"apt-get install [^&]*\b{pkg}\b", installs):
                    missing[f"{package}/{lib}"] = dep
    assert not missing, f"libraries the runtime stage does not install: {missing}"
    assert any("libgomp.so.1" in n for n in needed_libraries(site / "llama_cpp").values()), (
        "llama.cpp links libgomp (why the stage installs libgomp1)"
    )


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.gpu"])
def test_every_path_the_deployments_name_is_in_the_image(dockerfile) -> None:
    files = image_files(DOCKER / dockerfile)

    def present(path: str) -> bool:
        return path in files or any(f.startswith(path.rstrip("/") + "/") for f in files)

    # what `ragline loadtest`, `ragline trace`, `ragline protos` and the docs' commands read
    for path in ("/app/loadtest/locustfile.py", "/app/loadtest/chat.jmx", "/app/loadtest/ghz",
                 "/app/protos/ragline/v1/generate.proto", "/app/corpus/load_questions.csv",
                 "/app/corpus/handbook", "/app/cli/main.py", "/app/pyproject.toml"):  # fmt: skip
        assert present(path), f"{dockerfile}: {path} is not in the image"
    texts = [(ROOT / "docker-compose.yml").read_text(), (ROOT / "README.md").read_text(),
             *(p.read_text() for p in K8S)]  # fmt: skip
    for text in texts:
        for path in re.findall(r"(/app/[\w./-]+[\w])", text):
            assert present(path), f"{dockerfile}: {path} (named in a deployment file) missing"
    if dockerfile == "Dockerfile.gpu":
        assert "/usr/local/bin/ragline-claim-gpu" in files
        assert os.access(DOCKER / "claim-gpu.sh", os.X_OK), "the entrypoint must be executable"


def test_the_gpu_image_compiles_exllamav2_at_build_time_and_runs_without_a_toolkit() -> None:
    stages = dockerfile_stages(DOCKER / "Dockerfile.gpu")
    build, runtime = stages[0], stages[-1]
    runs = " ".join(rest for op, rest in build["ops"] if op == "RUN")
    assert "--no-binary exllamav2" in runs and "--no-build-isolation" in runs
    assert "find_spec('exllamav2_ext')" in runs, "the build fails if the extension is missing"
    assert any(op == "ENV" and "TORCH_CUDA_ARCH_LIST" in rest for op, rest in build["ops"])
    text = (DOCKER / "Dockerfile.gpu").read_text()
    assert "FROM ${TORCH_IMAGE}-runtime" in text and "FROM ${TORCH_IMAGE}-devel AS build" in text
    assert not any("EXLLAMA_NOCOMPILE" in rest for _, rest in build["ops"] + runtime["ops"])
