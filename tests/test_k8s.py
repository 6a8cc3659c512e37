"""The Kubernetes manifests (deploy/k8s/), checked by rendering them: no cluster is needed.

`kubectl kustomize` renders the base and every overlay; the rendered objects are validated
against the Kubernetes schemas (kubernetes-validate, strict: unknown fields fail) and the
custom resources against the CRD schemas in tests/schemas/. Then, as tests/test_deploy.py
does for compose, the objects are checked against each other and against the code: flags
and ports against the server's real --help and Settings, probe service names against what
the real server's health service says, grace periods against the drain, images and users
against the Dockerfile, and the alert rules' PromQL against the server's metric names,
through promtool. Without kubectl (or promtool) the tests that need it skip.
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import pytest
import referencing
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .deploy_files import (
    DASHBOARD,
    DOCKERFILE,
    REPO,
    dashboard_exprs,
    effective,
    help_text,
    import_or_skip,
    load_yaml,
    mentions,
    parse_dockerfile,
    promql_names,
    promtool,
)
from .support import ServerProcess

K8S = REPO / "deploy" / "k8s"
OVERLAYS = {
    "base": K8S / "base",
    "tls": K8S / "overlays" / "tls",
    "mtls": K8S / "overlays" / "mtls",
    "kserve": K8S / "overlays" / "kserve",
    "auth": K8S / "overlays" / "auth",
}
# The overlays that run the base's server Deployment (kserve lets KServe run it).
DEPLOYMENT_OVERLAYS = ("base", "tls", "mtls", "auth")
SCHEMAS = REPO / "tests" / "schemas"
CUSTOM_SCHEMAS = {
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "servingruntime.schema.yaml",
    ("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservice.schema.yaml",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.schema.yaml",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule.schema.yaml",
}
# The oldest Kubernetes the manifests promise (gRPC probes are GA from 1.27), and the newest
# kubernetes-validate knows.
OLDEST_KUBERNETES = "1.27.0"

# The server's contract (see the project plan): health names that say SERVING once a model
# is loaded, and the defaults of flags that other branches are adding.
HEALTH_SERVICES = frozenset(
    {
        "",
        "mnist.v1.MnistService",
        "tensorflow.serving.PredictionService",
        "tensorflow.serving.ModelService",
        "inference.GRPCInferenceService",
    }
)
CONTRACT_DEFAULTS = {"http_port": 8501, "drain_delay": 0.0, "workers": 1}
# What the kubelet needs beyond --drain-delay + --grace-period to see the process exit.
EXIT_MARGIN_SECONDS = 5
# Resident memory per worker process, by runtime, and the supervisor's own (the lead
# corrects these once measured; the Deployment's comment carries the same figures).
WORKER_RSS_MIB = {"litert": 150, "tensorflow": 740}
SUPERVISOR_RSS_MIB = 60

SERVER_CONTAINERS = ("server", "kserve-container")


# ---------------------------------------------------------------------------------------------
# Rendering and reading


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl is not installed (its built-in kustomize renders deploy/k8s/)")
    return path


@functools.cache
def _render(overlay: str) -> tuple[dict[str, Any], ...]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(OVERLAYS[overlay])],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {overlay}: {result.stderr}"
    return tuple(item for item in yaml.safe_load_all(result.stdout) if item)


def render(overlay: str) -> list[dict[str, Any]]:
    """The overlay's objects, as `kubectl kustomize` writes them (a fresh copy each call)."""
    return copy.deepcopy(list(_render(overlay)))


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        item
        for item in objects
        if item["kind"] == kind and (name is None or item["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def find_all(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [item for item in objects if item["kind"] == kind]


def pod_spec(objects: list[dict[str, Any]], overlay: str) -> dict[str, Any]:
    """The server pod's spec: the Deployment's template, or KServe's runtime and predictor."""
    if overlay == "kserve":
        runtime = find(objects, "ServingRuntime")["spec"]
        predictor = find(objects, "InferenceService")["spec"]["predictor"]
        return {**predictor, "containers": runtime["containers"], "volumes": runtime["volumes"]}
    spec: dict[str, Any] = find(objects, "Deployment", "mnist-serving")["spec"]["template"]["spec"]
    return spec


def server_container(spec: dict[str, Any]) -> dict[str, Any]:
    [container] = [c for c in spec["containers"] if c["name"] in SERVER_CONTAINERS]
    return dict(container)


def flags(container: dict[str, Any]) -> dict[str, str]:
    """The container's `--flag value` arguments (every flag here takes a value)."""
    args = [str(arg) for arg in container.get("args", [])]
    found: dict[str, str] = {}
    for index, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        name, equals, value = arg.partition("=")
        if not equals:
            assert index + 1 < len(args), f"{arg} has no value"
            value = args[index + 1]
            assert not value.startswith("--"), f"{arg} has no value"
        assert name not in found, f"{name} given twice"
        found[name] = value
    return found


def field_name(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


def settings_defaults() -> dict[str, Any]:
    settings = import_or_skip("mnist_serving.server.settings")
    defaults = dict(CONTRACT_DEFAULTS)
    for name, info in settings.Settings.model_fields.items():
        if not info.is_required() and info.default_factory is None:
            defaults[name] = info.default
    return defaults


def setting(container: dict[str, Any], name: str) -> Any:
    """A server setting as the container runs it: its flag, else the server's default."""
    value = flags(container).get("--" + name.replace("_", "-"))
    return settings_defaults()[name] if value is None else value


def port_numbers(container: dict[str, Any]) -> dict[str, int]:
    return {port["name"]: int(port["containerPort"]) for port in container.get("ports", [])}


def probes(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    kinds = ("startupProbe", "readinessProbe", "livenessProbe")
    return {kind: container[kind] for kind in kinds if kind in container}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels is used here: {selector}"
    return all(labels.get(key) == value for key, value in selector["matchLabels"].items())


@functools.cache
def serve_help() -> str:
    return help_text("mnist_serving.server.__main__", "mnist-serve", "--help")


def dockerfile_images() -> dict[str, str]:
    """Build target -> image name, from the Dockerfile's own `docker build` lines."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    images = dict(re.findall(r"docker build --target (\S+)\s+-t (\S+)", text))
    assert images, "the Dockerfile documents no `docker build --target X -t NAME` line"
    return images


def dockerfile_user(target: str) -> tuple[int, int]:
    stages = {s.name: s for s in parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))}
    user = effective(stages, target, "USER")
    assert user, f"the {target} stage sets no USER"
    uid, _, gid = user.partition(":")
    return int(uid), int(gid or uid)


def mebibytes(quantity: str) -> float:
    units = {"Ki": 2**-10, "Mi": 1.0, "Gi": 2**10, "K": 1e3 / 2**20, "M": 1e6 / 2**20}
    units["G"] = 1e9 / 2**20
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMG]i?)?", str(quantity))
    assert match, f"unexpected memory quantity {quantity!r}"
    return float(match.group(1)) * units.get(match.group(2) or "", 2**-20)


def cores(quantity: str | int) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


# ---------------------------------------------------------------------------------------------
# Rendering and schemas


EXPECTED_KINDS = {
    "base": {
        "PersistentVolumeClaim", "Job", "Deployment", "Service", "PodDisruptionBudget",
        "HorizontalPodAutoscaler", "ServiceMonitor", "PrometheusRule", "ConfigMap",
    },
    "kserve": {
        "PersistentVolumeClaim", "Job", "ServingRuntime", "InferenceService", "PrometheusRule",
        "ConfigMap",
    },
}  # fmt: skip
EXPECTED_KINDS["tls"] = EXPECTED_KINDS["mtls"] = EXPECTED_KINDS["auth"] = EXPECTED_KINDS["base"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_renders(overlay: str) -> None:
    objects = render(overlay)
    assert {item["kind"] for item in objects} == EXPECTED_KINDS[overlay]
    names = [(item["kind"], item["metadata"]["name"]) for item in objects]
    assert len(names) == len(set(names)), names
    for item in objects:
        labels = item["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/part-of") == "mnist-serving", names
        assert "namespace" not in item["metadata"], "leave the namespace to kubectl -n"


def kubernetes_versions() -> list[str]:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    return [OLDEST_KUBERNETES, str(kubernetes_validate.latest_version())]


@functools.cache
def kubernetes_definitions(version: str) -> referencing.Resource[Any]:
    """kubernetes-validate's shared definitions, which the CRD schemas here refer to."""
    base = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    folder = f"v{version}-local-strict"
    text = (base / folder / "_definitions.json").read_text(encoding="utf-8")
    return referencing.Resource.from_contents(yaml.safe_load(text))


def custom_resource_errors(item: dict[str, Any], version: str) -> list[str]:
    key = (item["apiVersion"], item["kind"])
    assert key in CUSTOM_SCHEMAS, f"no schema for {key}"
    schema = load_yaml(SCHEMAS / CUSTOM_SCHEMAS[key])
    registry: referencing.Registry[Any] = kubernetes_definitions(version) @ referencing.Registry()
    validator = jsonschema.Draft202012Validator(schema, registry=registry)
    return [
        f"{'.'.join(str(part) for part in error.absolute_path)}: {error.message}"
        for error in validator.iter_errors(item)
    ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_objects_validate_against_the_schemas(overlay: str) -> None:
    """Built-in kinds against Kubernetes' own (strict) schemas, the others against their CRD's."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for version in kubernetes_versions():
        for item in render(overlay):
            where = f"{item['kind']}/{item['metadata']['name']} (Kubernetes {version})"
            if (item["apiVersion"], item["kind"]) in CUSTOM_SCHEMAS:
                errors = custom_resource_errors(item, version)
                assert not errors, f"{where}: {errors}"
                continue
            try:
                kubernetes_validate.validate(item, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                path = ".".join(str(part) for part in error.path)
                pytest.fail(f"{where}: {path}: {error.message}")


@pytest.mark.parametrize(
    ("overlay", "kind", "path", "typo"),
    [
        ("kserve", "ServingRuntime", ["spec"], "protocolVersion"),
        ("kserve", "InferenceService", ["spec", "predictor", "model"], "storageURI"),
        ("base", "ServiceMonitor", ["spec", "endpoints", 0], "intervall"),
        ("base", "PrometheusRule", ["spec", "groups", 0, "rules", 0], "annotation"),
    ],
)
def test_the_crd_schemas_refuse_unknown_fields(
    overlay: str, kind: str, path: list[str | int], typo: str
) -> None:
    """A misspelt field fails, as the API server's strict field validation would refuse it."""
    version = kubernetes_versions()[-1]
    item = find(render(overlay), kind)
    assert custom_resource_errors(item, version) == []
    holder: Any = item
    for part in path:
        holder = holder[part]
    holder[typo] = "x"
    errors = custom_resource_errors(item, version)
    assert any(typo in error for error in errors), errors


# ---------------------------------------------------------------------------------------------
# Against the server's flags and settings


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_server_flags_exist_in_the_cli(overlay: str) -> None:
    """Every flag the pod passes is in `mnist-serve --help` (run for real)."""
    container = server_container(pod_spec(render(overlay), overlay))
    missing = [flag for flag in flags(container) if not mentions(serve_help(), flag)]
    assert not missing, f"mnist-serve --help has no {missing}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_server_flag_values_are_valid_settings(overlay: str) -> None:
    """The values pass the server's own Settings checks (for the flags this branch has)."""
    settings = import_or_skip("mnist_serving.server.settings")
    container = server_container(pod_spec(render(overlay), overlay))
    known = settings.Settings.model_fields
    # The TLS and keys files exist only in the pod, and --health-port goes with TLS.
    values = {
        field_name(flag): value
        for flag, value in flags(container).items()
        if field_name(flag) in known
        and not flag.startswith(("--tls-", "--health-port", "--auth-keys"))
    }
    assert values, "no flag the server knows"
    settings.Settings(**values)


def test_trainer_flags_exist_in_the_cli() -> None:
    trainer_help = help_text("mnist_serving.trainer.__main__", "mnist-train", "--help")
    job = find(render("base"), "Job", "mnist-trainer")
    [container] = job["spec"]["template"]["spec"]["containers"]
    for flag in flags(container):
        assert mentions(trainer_help, flag), f"mnist-train has no {flag}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_container_ports_are_the_ports_the_server_opens(overlay: str) -> None:
    container = server_container(pod_spec(render(overlay), overlay))
    ports = port_numbers(container)
    names = {"grpc": "port", "http": "http_port", "metrics": "metrics_port"}
    if overlay == "kserve":  # KServe's port names: http1 is what its Service routes to.
        names = {"h2c": "port", "http1": "http_port", "metrics": "metrics_port"}
        assert container["ports"][0]["name"] == "http1", "KServe routes to the first port"
    for port_name, setting_name in names.items():
        assert port_name in ports, f"no container port named {port_name}"
        assert ports[port_name] == int(setting(container, setting_name)), port_name
    if "--health-port" in flags(container):
        assert ports.get("health") == int(flags(container)["--health-port"])
    assert len(set(ports.values())) == len(ports), f"two names for one port: {ports}"


def test_image_exposes_the_base_ports() -> None:
    """The Dockerfile's EXPOSE lists the gRPC and HTTP ports the base serves on."""
    stages = {s.name: s for s in parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))}
    exposed = {int(port) for i in stages["server"].all("EXPOSE") for port in i.args.split()}
    ports = port_numbers(server_container(pod_spec(render("base"), "base")))
    assert {ports["grpc"], ports["http"]} <= exposed, exposed


# ---------------------------------------------------------------------------------------------
# Probes, drain and grace


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_ask_the_grpc_health_service(overlay: str) -> None:
    container = server_container(pod_spec(render(overlay), overlay))
    found = probes(container)
    assert set(found) == {"startupProbe", "readinessProbe", "livenessProbe"}, set(found)
    server_flags = flags(container)
    tls = "--tls-cert" in server_flags
    # With TLS on, the probes (which cannot speak TLS) go to the plaintext health port.
    port = int(server_flags["--health-port"] if tls else setting(container, "port"))
    for kind, probe in found.items():
        assert set(probe) & {"exec", "httpGet", "tcpSocket"} == set(), f"{kind}: use grpc:"
        assert probe["grpc"]["port"] == port, f"{kind} asks port {probe['grpc']['port']}"
        service = probe["grpc"].get("service", "")
        assert service in HEALTH_SERVICES, f"{kind}: {service!r} is no health service name"


@pytest.fixture
def probe_services() -> set[str]:
    """Every health service name a probe asks for, in any overlay."""
    return {
        probe["grpc"].get("service", "")
        for overlay in OVERLAYS
        for probe in probes(server_container(pod_spec(render(overlay), overlay))).values()
    }


def test_probed_services_say_serving_on_the_real_server(
    probe_services: set[str], served_tiny: ServerProcess
) -> None:
    """Each service name a probe asks for is one the real server's health service knows."""
    with grpc.insecure_channel(served_tiny.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        unknown = []
        for service in sorted(probe_services):
            try:
                answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                unknown.append(service)
                continue
            assert answer.status == health_pb2.HealthCheckResponse.SERVING, service
    assert not unknown, f"the server has no health status for {unknown}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_covers_the_drain(overlay: str) -> None:
    """SIGTERM -> --drain-delay (still serving) -> --grace-period (in-flight calls) -> exit.

    The server waits out the drain itself, so there is no preStop hook (a preStop sleep
    would add to the time and duplicate the wait).
    """
    spec = pod_spec(render(overlay), overlay)
    container = server_container(spec)
    assert "preStop" not in container.get("lifecycle", {}), "--drain-delay does the waiting"
    drain = float(setting(container, "drain_delay"))
    grace = float(setting(container, "grace_period"))
    assert drain > 0, "set --drain-delay so that endpoints drop the pod before it stops"
    needed = drain + grace + EXIT_MARGIN_SECONDS
    termination = spec.get("terminationGracePeriodSeconds", 30)
    assert termination > needed, f"{termination}s: the kubelet kills before {needed}s"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_readiness_notices_the_drain_within_the_delay(overlay: str) -> None:
    container = server_container(pod_spec(render(overlay), overlay))
    readiness = container["readinessProbe"]
    noticed = readiness.get("periodSeconds", 10) * readiness.get("failureThreshold", 3)
    assert noticed <= float(setting(container, "drain_delay")), noticed


# ---------------------------------------------------------------------------------------------
# Security, images, resources


def pods(overlay: str) -> Iterator[tuple[str, dict[str, Any]]]:
    objects = render(overlay)
    for job in find_all(objects, "Job"):
        yield "trainer", job["spec"]["template"]["spec"]
    if overlay == "kserve":
        yield "server", pod_spec(objects, overlay)
    else:
        for deployment in find_all(objects, "Deployment"):
            yield "server", deployment["spec"]["template"]["spec"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_as_the_image_user_without_privileges(overlay: str) -> None:
    for target, spec in pods(overlay):
        uid, gid = dockerfile_user(target)
        context = spec["securityContext"]
        assert context["runAsNonRoot"] is True, target
        assert (context["runAsUser"], context["runAsGroup"]) == (uid, gid), target
        # The model volume must be readable (server) and writable (trainer) by that group.
        assert context["fsGroup"] == gid, target
        assert context["seccompProfile"]["type"] == "RuntimeDefault", target
        assert spec.get("automountServiceAccountToken") is False, target
        # Service link variables would land in the MNIST_SERVING_* namespace the server reads
        # its settings from (the Service mnist-serving gives MNIST_SERVING_PORT=tcp://...).
        assert spec.get("enableServiceLinks") is False, target
        for container in spec.get("initContainers", []) + spec["containers"]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, container["name"]
            assert security["readOnlyRootFilesystem"] is True, container["name"]
            assert security["capabilities"]["drop"] == ["ALL"], container["name"]
            assert not security.get("privileged", False), container["name"]
            if "runAsUser" in security:
                assert security["runAsUser"] == uid, container["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_the_dockerfile_targets(overlay: str) -> None:
    images = dockerfile_images()
    for target, spec in pods(overlay):
        for container in spec.get("initContainers", []) + spec["containers"]:
            assert container["image"] == images[target], f"{container['name']}: {target} image"
            assert container.get("imagePullPolicy") == "IfNotPresent", container["name"]
    stages = {s.name for s in parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))}
    assert {"server", "trainer"} <= set(images) <= stages
    version = load_pyproject_version()
    assert {image.rpartition(":")[2] for image in images.values()} == {version}
    for item in render(overlay):
        assert item["metadata"]["labels"]["app.kubernetes.io/version"] == version


def load_pyproject_version() -> str:
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11+")
    with (REPO / "pyproject.toml").open("rb") as stream:
        version: str = tomllib.load(stream)["project"]["version"]
    return version


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_and_limits(overlay: str) -> None:
    for _, spec in pods(overlay):
        for container in spec.get("initContainers", []) + spec["containers"]:
            resources = container["resources"]
            for kind in ("cpu", "memory"):
                request, limit = resources["requests"][kind], resources["limits"][kind]
                convert = cores if kind == "cpu" else mebibytes
                assert convert(request) <= convert(limit), f"{container['name']} {kind}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_server_resources_fit_the_workers_and_runtime(overlay: str) -> None:
    """One core per worker; memory for every worker of the runtime --runtime may pick."""
    container = server_container(pod_spec(render(overlay), overlay))
    workers = setting(container, "workers")
    assert str(workers).isdigit(), "set --workers to a number, so that resources can match it"
    workers = int(workers)
    runtime = str(setting(container, "runtime") if "--runtime" in flags(container) else "auto")
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    assert cores(requests["cpu"]) == workers, "one CPU of request per worker"
    # auto may fall back to TensorFlow for a version without a LiteRT twin: the limit must
    # hold that; the request is sized for the runtime auto normally picks.
    request_rss = WORKER_RSS_MIB["tensorflow" if runtime == "tensorflow" else "litert"]
    limit_rss = WORKER_RSS_MIB["litert" if runtime == "litert" else "tensorflow"]
    assert mebibytes(requests["memory"]) >= workers * request_rss + SUPERVISOR_RSS_MIB
    assert mebibytes(limits["memory"]) >= workers * limit_rss + SUPERVISOR_RSS_MIB


# ---------------------------------------------------------------------------------------------
# The model volume


def mount_of(container: dict[str, Any], volume: str) -> dict[str, Any]:
    [mount] = [m for m in container["volumeMounts"] if m["name"] == volume]
    return dict(mount)


def claim_volume(spec: dict[str, Any], claim: str) -> dict[str, Any]:
    [volume] = [
        v for v in spec["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == claim
    ]
    return dict(volume)


def test_trainer_writes_where_the_server_reads() -> None:
    objects = render("base")
    claim = find(objects, "PersistentVolumeClaim")["metadata"]["name"]
    job = find(objects, "Job")
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    trainer_spec = job["spec"]["template"]["spec"]
    [trainer] = trainer_spec["containers"]
    trainer_volume = claim_volume(trainer_spec, claim)
    trainer_mount = mount_of(trainer, trainer_volume["name"])
    assert not trainer_mount.get("readOnly", False)
    model_dir = flags(trainer)["--model-dir"]
    assert model_dir.startswith(trainer_mount["mountPath"].rstrip("/") + "/"), model_dir

    spec = pod_spec(objects, "base")
    volume = claim_volume(spec, claim)
    assert volume["persistentVolumeClaim"].get("readOnly") is True
    for container in spec["initContainers"] + spec["containers"]:
        mount = mount_of(container, volume["name"])
        assert mount.get("readOnly") is True, container["name"]
        assert mount["mountPath"] == trainer_mount["mountPath"], container["name"]
    assert flags(server_container(spec))["--model-dir"] == model_dir
    # The init container waits for the layout the trainer exports: <model-dir>/<N>/saved_model.pb
    [wait] = spec["initContainers"]
    assert f"{model_dir}/*/saved_model.pb" in " ".join(wait["command"])


def test_kserve_serves_the_trainer_volume() -> None:
    objects = render("kserve")
    claim = find(objects, "PersistentVolumeClaim")["metadata"]["name"]
    [trainer] = find(objects, "Job")["spec"]["template"]["spec"]["containers"]
    model_dir = Path(flags(trainer)["--model-dir"])
    mount = Path(mount_of(trainer, "models")["mountPath"])
    model = find(objects, "InferenceService")["spec"]["predictor"]["model"]
    assert model["storageUri"] == f"pvc://{claim}/{model_dir.relative_to(mount)}"
    # KServe mounts the storageUri at /mnt/models.
    assert flags(server_container(pod_spec(objects, "kserve")))["--model-dir"] == "/mnt/models"


# ---------------------------------------------------------------------------------------------
# Services, scaling, disruption, scraping


def server_pod_labels(objects: list[dict[str, Any]]) -> dict[str, str]:
    labels: dict[str, str] = find(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    return labels


@pytest.mark.parametrize("overlay", DEPLOYMENT_OVERLAYS)
def test_services_reach_the_server_ports(overlay: str) -> None:
    objects = render(overlay)
    deployment = find(objects, "Deployment")
    assert selects(deployment["spec"]["selector"], server_pod_labels(objects))
    ports = port_numbers(server_container(pod_spec(objects, overlay)))
    service = find(objects, "Service", "mnist-serving")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    by_name = {port["name"]: port for port in service["spec"]["ports"]}
    assert set(by_name) == {"grpc", "http", "metrics"}
    for name, port in by_name.items():
        assert port["targetPort"] == name, "target the container port by name"
        assert port["port"] == ports[name], name


@pytest.mark.parametrize("overlay", DEPLOYMENT_OVERLAYS)
def test_headless_service_lists_every_server_pod(overlay: str) -> None:
    """For `dns:///mnist-serving-headless:8500` with round_robin: one A record per ready pod."""
    objects = render(overlay)
    headless = find(objects, "Service", "mnist-serving-headless")["spec"]
    assert headless["clusterIP"] == "None"
    assert not headless.get("publishNotReadyAddresses", False), "a draining pod must leave DNS"
    assert selects({"matchLabels": headless["selector"]}, server_pod_labels(objects))
    grpc_port = port_numbers(server_container(pod_spec(objects, overlay)))["grpc"]
    assert {"name": "grpc", "port": grpc_port} in [
        {"name": p["name"], "port": p["port"]} for p in headless["ports"]
    ]


def test_autoscaler_scales_the_deployment_on_cpu() -> None:
    objects = render("base")
    deployment = find(objects, "Deployment")
    hpa = find(objects, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
    assert 2 <= hpa["minReplicas"] < hpa["maxReplicas"]
    [metric] = hpa["metrics"]
    assert metric["type"] == "Resource"
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    assert 0 < metric["resource"]["target"]["averageUtilization"] < 100
    # Utilisation is measured against the request: it must be set (see the resources test).
    assert server_container(pod_spec(objects, "base"))["resources"]["requests"]["cpu"]


def test_rollouts_and_disruptions_keep_a_pod_serving() -> None:
    objects = render("base")
    deployment = find(objects, "Deployment")["spec"]
    assert deployment["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pdb = find(objects, "PodDisruptionBudget")["spec"]
    assert selects(pdb["selector"], server_pod_labels(objects))
    minimum = find(objects, "HorizontalPodAutoscaler")["spec"]["minReplicas"]
    if "maxUnavailable" in pdb:
        assert 1 <= pdb["maxUnavailable"] < minimum
    else:
        assert 1 <= pdb["minAvailable"] < minimum, "a drain could never evict a pod"


@pytest.mark.parametrize("overlay", DEPLOYMENT_OVERLAYS)
def test_service_monitor_scrapes_each_pod_once_on_the_metrics_port(overlay: str) -> None:
    objects = render(overlay)
    monitor = find(objects, "ServiceMonitor")["spec"]
    services = find_all(objects, "Service")
    selected = [s for s in services if selects(monitor["selector"], s["metadata"]["labels"])]
    assert [s["metadata"]["name"] for s in selected] == ["mnist-serving"], "scraped twice"
    [endpoint] = monitor["endpoints"]
    [service_port] = [p for p in selected[0]["spec"]["ports"] if p["name"] == endpoint["port"]]
    container = server_container(pod_spec(objects, overlay))
    metrics_port = int(setting(container, "metrics_port"))
    assert port_numbers(container)[service_port["targetPort"]] == metrics_port
    assert endpoint.get("path", "/metrics") == "/metrics"
    assert endpoint.get("scheme", "http") == "http", "the metrics port is plaintext"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_carry_the_plain_prometheus_annotations(overlay: str) -> None:
    objects = render(overlay)
    if overlay == "kserve":
        annotations = find(objects, "InferenceService")["spec"]["predictor"]["annotations"]
    else:
        annotations = find(objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    container = server_container(pod_spec(objects, overlay))
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == int(setting(container, "metrics_port"))
    assert annotations["prometheus.io/path"] == "/metrics"


# ---------------------------------------------------------------------------------------------
# TLS


TLS_DIR_KEYS = {"--tls-cert": "tls.crt", "--tls-key": "tls.key", "--tls-client-ca": "ca.crt"}


@pytest.mark.parametrize(
    ("overlay", "expected"),
    [
        ("base", set()),
        ("tls", {"--tls-cert", "--tls-key"}),
        ("mtls", {"--tls-cert", "--tls-key", "--tls-client-ca"}),
        ("auth", {"--tls-cert", "--tls-key"}),
    ],
)
def test_tls_files_come_from_the_secret(overlay: str, expected: set[str]) -> None:
    spec = pod_spec(render(overlay), overlay)
    container = server_container(spec)
    server_flags = flags(container)
    assert {flag for flag in server_flags if flag.startswith("--tls-")} == expected
    if not expected:
        assert "--health-port" not in server_flags
        return
    assert "--health-port" in server_flags, "probes need the plaintext health port"
    [volume] = [
        v for v in spec["volumes"] if v.get("secret", {}).get("secretName") == "mnist-serving-tls"
    ]
    mount = mount_of(container, volume["name"])
    assert mount["readOnly"] is True
    for flag in expected:
        # The key names of a kubernetes.io/tls Secret (and cert-manager's ca.crt).
        assert server_flags[flag] == f"{mount['mountPath']}/{TLS_DIR_KEYS[flag]}", flag


@pytest.mark.parametrize("overlay", DEPLOYMENT_OVERLAYS)
def test_api_keys_come_from_their_secret_only_where_turned_on(overlay: str) -> None:
    """Off by default; overlays/auth (components/auth) mounts the keys Secret as a folder
    (never subPath, which would not see a rotated Secret) and points --auth-keys into it."""
    spec = pod_spec(render(overlay), overlay)
    container = server_container(spec)
    server_flags = flags(container)
    keys = [
        v for v in spec["volumes"] if v.get("secret", {}).get("secretName") == "mnist-serving-keys"
    ]
    if overlay != "auth":
        assert "--auth-keys" not in server_flags
        assert not keys
        return
    [volume] = keys
    mount = mount_of(container, volume["name"])
    assert mount["readOnly"] is True
    assert "subPath" not in mount
    assert server_flags["--auth-keys"] == f"{mount['mountPath']}/keys.json"
    assert "--tls-cert" in server_flags, "tokens must not cross the network in plaintext"
    assert "--metrics-auth" not in server_flags  # Prometheus scrapes without a key


@pytest.mark.parametrize("overlay", DEPLOYMENT_OVERLAYS)
def test_service_app_protocols_follow_tls(overlay: str) -> None:
    tls = overlay != "base"
    for name in ("mnist-serving", "mnist-serving-headless"):
        ports = {p["name"]: p for p in find(render(overlay), "Service", name)["spec"]["ports"]}
        assert ports["grpc"].get("appProtocol") == (None if tls else "kubernetes.io/h2c")
        assert ports["http"]["appProtocol"] == ("https" if tls else "http")


# ---------------------------------------------------------------------------------------------
# KServe


def test_serving_runtime_speaks_v2_and_serves_the_inference_service_format() -> None:
    objects = render("kserve")
    runtime = find(objects, "ServingRuntime")
    service = find(objects, "InferenceService")
    spec = runtime["spec"]
    assert {"v2", "grpc-v2"} <= set(spec["protocolVersions"])
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["protocolVersion"] in spec["protocolVersions"]
    assert model["modelFormat"] in [
        {key: fmt[key] for key in ("name", "version") if key in fmt}
        for fmt in spec["supportedModelFormats"]
    ]
    container = server_container(pod_spec(objects, "kserve"))
    assert container["name"] == "kserve-container", "KServe's name for the predictor"
    # v2 clients address the model by the InferenceService's name, which KServe fills in.
    assert flags(container)["--model-name"] == "{{.Name}}"
    annotations = service["metadata"]["annotations"]
    # gRPC probes and several ports need plain Deployments (Knative allows one port).
    assert annotations["serving.kserve.io/deploymentMode"] == "RawDeployment"
    metrics = int(setting(container, "metrics_port"))
    assert int(runtime["metadata"]["annotations"]["prometheus.kserve.io/port"]) == metrics


# ---------------------------------------------------------------------------------------------
# Dashboard and alert rules


@pytest.mark.parametrize("overlay", ["base", "kserve"])
def test_dashboard_config_map_is_the_compose_dashboard(overlay: str) -> None:
    config_map = find(render(overlay), "ConfigMap", "mnist-serving-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["data"] == {DASHBOARD.name: DASHBOARD.read_text(encoding="utf-8")}


def alert_rules() -> dict[str, dict[str, Any]]:
    rule = find(render("base"), "PrometheusRule")
    return {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}


REQUIRED_ALERTS = {
    "MnistServingHighErrorRatio",
    "MnistServingHighLatencyP99",
    "MnistServingShedding",
    "MnistServingNoModelLoaded",
}
# Model quality (tests/test_drift.py checks their thresholds against a real server).
DRIFT_ALERTS = {
    "MnistServingClassMixDrift": "mnist_class_mix_divergence",
    "MnistServingConfidenceDrift": "mnist_confidence_divergence",
    "MnistServingLowConfidence": "mnist_low_confidence_rate",
    "MnistServingInputIntensityDrift": "mnist_input_mean_intensity_divergence",
    "MnistServingInputInkDrift": "mnist_input_ink_fraction_divergence",
}


def test_alerts_cover_errors_latency_shedding_and_no_model() -> None:
    rules = alert_rules()
    assert set(rules) == REQUIRED_ALERTS | set(DRIFT_ALERTS)
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"], name
        assert rule.get("for"), f"{name}: fire on a condition that lasts, not one scrape"


def threshold_free(expr: str) -> str:
    """An alert's expression without its trailing `> N` comparison."""
    match = re.fullmatch(r"(.*\S)\s*>\s*[\d.]+", expr.strip(), flags=re.DOTALL)
    assert match, f"no trailing threshold: {expr}"
    return " ".join(match.group(1).split())


def test_error_ratio_and_latency_alerts_are_the_dashboard_queries() -> None:
    rules = alert_rules()
    dashboard = {" ".join(expr.split()) for expr in dashboard_exprs()}
    for name in ("MnistServingHighErrorRatio", "MnistServingHighLatencyP99"):
        query = threshold_free(rules[name]["expr"])
        assert query in dashboard, f"{name} drifted from the dashboard: {query}"
    assert "histogram_quantile(0.99," in rules["MnistServingHighLatencyP99"]["expr"]
    no_model = promql_names(rules["MnistServingNoModelLoaded"]["expr"])[0]
    assert no_model == {"mnist_model_version_info"}
    assert any("mnist_model_version_info" in expr for expr in dashboard)


def server_series() -> dict[str, frozenset[str]]:
    """Every sample name the server's metrics module exports, with its label names."""
    metrics = import_or_skip("mnist_serving.server.metrics")
    from prometheus_client.metrics import MetricWrapperBase

    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    series: dict[str, frozenset[str]] = {}
    for value in vars(metrics).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        labels = frozenset(value._labelnames)
        for family in value.describe():
            for suffix in suffixes.get(family.type, ("",)):
                extra = {"le"} if suffix == "_bucket" else set()
                series[family.name.removesuffix("_total") + suffix] = labels | extra
    return series


def test_alert_queries_use_only_the_server_metrics() -> None:
    known = server_series()
    for name, rule in alert_rules().items():
        series, labels = promql_names(rule["expr"])
        assert series, f"{name} selects no metric"
        assert series <= set(known), f"{name}: unknown metric {series - set(known)}"
        allowed = frozenset({"instance", "job", "namespace", "pod"}).union(
            *(known[s] for s in series)
        )
        assert labels <= allowed, f"{name}: unknown label {labels - allowed}"


def rule_file(tmp_path: Path) -> Path:
    """The PrometheusRule's groups as a plain Prometheus rule file."""
    groups = find(render("base"), "PrometheusRule")["spec"]["groups"]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": groups}), encoding="utf-8")
    return path


def test_promtool_checks_the_rule_groups(tmp_path: Path) -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", str(rule_file(tmp_path))],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def expected_alert(name: str, value_text: str) -> dict[str, Any]:
    """The alert as Prometheus fires it, its templates filled with `value_text`."""
    rule = alert_rules()[name]
    annotations = {
        key: re.sub(r"\{\{ \$value \| \w+ \}\}", value_text, text)
        for key, text in rule["annotations"].items()
    }
    return {"exp_labels": dict(rule["labels"]), "exp_annotations": annotations}


def test_promtool_fires_the_alerts_on_known_series(tmp_path: Path) -> None:
    """Prometheus' own rule evaluator, fed known counters, fires (and holds) the alerts."""
    requests = 'mnist_requests_total{{api="native",method="Predict",code="{}"}}'
    ratio, shedding, no_model = (
        "MnistServingHighErrorRatio",
        "MnistServingShedding",
        "MnistServingNoModelLoaded",
    )

    def check(alert: str, *fired: dict[str, Any]) -> dict[str, Any]:
        return {"eval_time": "10m", "alertname": alert, "exp_alerts": list(fired)}

    loaded = 'mnist_model_version_info{name="mnist",version="1"}'
    tests = {
        "rule_files": [str(rule_file(tmp_path))],
        "evaluation_interval": "15s",
        "tests": [
            {
                # Per 15 s: 30 OK and 10 failed requests, a 25% error ratio, from the start.
                "interval": "15s",
                "input_series": [
                    {"series": requests.format("OK"), "values": "0+30x60"},
                    {"series": requests.format("INVALID_ARGUMENT"), "values": "0+10x60"},
                    {"series": loaded, "values": "1x60"},
                ],
                "alert_rule_test": [
                    # Pending, not firing, before `for: 5m` has passed.
                    {"eval_time": "4m", "alertname": ratio, "exp_alerts": []},
                    check(ratio, expected_alert(ratio, "25%")),
                    check(no_model),
                    check(shedding),
                ],
            },
            {
                # Only OK requests, but 2 calls/s shed, and no model loaded anywhere.
                "interval": "15s",
                "input_series": [
                    {"series": requests.format("OK"), "values": "0+30x60"},
                    {"series": "mnist_requests_shed_total", "values": "0+30x60"},
                ],
                "alert_rule_test": [
                    check(ratio),
                    check(shedding, expected_alert(shedding, "2")),
                    check(no_model, expected_alert(no_model, "")),
                ],
            },
        ],
    }
    path = tmp_path / "tests.yml"
    path.write_text(yaml.safe_dump(tests), encoding="utf-8")
    result = subprocess.run(
        [promtool(), "test", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_fires_the_drift_alerts_per_version(tmp_path: Path) -> None:
    """Each drift alert fires for the version whose gauge stays over its threshold for the
    rule's `for`, from any worker's series (max by version), and not for a version below."""
    rules = alert_rules()
    input_series = []
    checks = []
    for alert, gauge in DRIFT_ALERTS.items():
        limit = float(threshold_of(rules[alert]["expr"]))
        input_series += [
            # Version 2 drifts in one of its two workers; version 1 stays just below.
            {"series": f'{gauge}{{version="2",pid="10"}}', "values": f"{limit / 2}x80"},
            {"series": f'{gauge}{{version="2",pid="11"}}', "values": f"{limit * 2}x80"},
            {"series": f'{gauge}{{version="1",pid="10"}}', "values": f"{limit * 0.9}x80"},
        ]
        fired = {
            "exp_labels": {**rules[alert]["labels"], "version": "2"},
            "exp_annotations": {
                key: text.replace("{{ $labels.version }}", "2")
                .replace('{{ printf "%.3f" $value }}', f"{limit * 2:.3f}")
                .replace("{{ $value | humanizePercentage }}", f"{limit * 200:.4g}%")
                for key, text in rules[alert]["annotations"].items()
            },
        }
        checks += [
            {"eval_time": "10m", "alertname": alert, "exp_alerts": []},  # pending (for: 15m)
            {"eval_time": "19m", "alertname": alert, "exp_alerts": [fired]},
        ]
    tests = {
        "rule_files": [str(rule_file(tmp_path))],
        "evaluation_interval": "15s",
        "tests": [{"interval": "15s", "input_series": input_series, "alert_rule_test": checks}],
    }
    path = tmp_path / "tests.yml"
    path.write_text(yaml.safe_dump(tests), encoding="utf-8")
    result = subprocess.run(
        [promtool(), "test", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def threshold_of(expr: str) -> str:
    match = re.fullmatch(r".*>\s*([\d.]+)", expr.strip(), flags=re.DOTALL)
    assert match, f"no trailing threshold: {expr}"
    return match.group(1)
