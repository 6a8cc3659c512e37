"""The deployment files, checked by reading them: no Docker engine is needed.

docker-compose.yml, the Dockerfile, .dockerignore, the lock files, the Prometheus config and
the Grafana provisioning and dashboard are parsed and checked against each other, against the
repo, and against the metric names the server promises. Compose values are read with their
`${VAR:-default}` defaults, so the tests judge the repo as shipped, not the caller's shell.
Where a tool can say more (promtool, docker compose) it is run, and the test skips without it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from .deploy_files import (
    DASHBOARD,
    DOCKERFILE,
    GRAFANA,
    GROUPING,
    REPO,
    Stage,
    chain,
    dashboard_exprs,
    dashboard_panels,
    effective,
    exec_form,
    help_text,
    import_or_skip,
    load_yaml,
    mentions,
    parse_dockerfile,
    promql_names,
    promtool,
    seconds,
)

COMPOSE_FILE = REPO / "docker-compose.yml"
COMPOSE_AUTH_FILE = REPO / "docker-compose.auth.yml"  # API keys, added with a second -f
DOCKERIGNORE = REPO / ".dockerignore"
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus.yml"
LOCK_SCRIPT = REPO / "requirements" / "lock.sh"

ROLES = ("client", "server", "trainer")
ROLE_SCRIPTS = {"client": "mnist-client", "server": "mnist-serve", "trainer": "mnist-train"}
# The extra each image installs on top of the base (client) dependencies.
ROLE_EXTRAS = {"client": "images", "server": "server", "trainer": "trainer"}
TENSORFLOW_PACKAGES = {
    "tensorflow",
    "tensorflow-cpu",
    "tensorflow-intel",
    "tensorflow-serving-api",
    "tf-keras",
    "keras",
    "tensorboard",
}

# The server's metrics contract: sample name stem -> (type, label names).
METRICS: dict[str, tuple[str, frozenset[str]]] = {
    "mnist_requests_total": (
        "counter",
        frozenset({"api", "method", "code", "priority", "caller"}),
    ),
    "mnist_request_duration_seconds": (
        "histogram",
        frozenset({"api", "method", "priority", "caller"}),
    ),
    "mnist_batch_queue_wait_seconds": ("histogram", frozenset({"priority"})),
    "mnist_requests_shed_total": ("counter", frozenset({"priority"})),
    "mnist_model_inference_seconds": ("histogram", frozenset()),
    "mnist_images_predicted_total": ("counter", frozenset()),
    "mnist_batch_size_images": ("histogram", frozenset()),
    "mnist_requests_in_flight": ("gauge", frozenset()),
    "mnist_batch_queue_depth": ("gauge", frozenset()),
    "mnist_model_version_info": ("gauge", frozenset({"name", "version", "runtime"})),
    "mnist_model_load_seconds": ("gauge", frozenset({"version"})),
    "mnist_model_load_failures_total": ("counter", frozenset()),
    "mnist_predicted_class_total": ("counter", frozenset({"class"})),
    "mnist_auth_failures_total": ("counter", frozenset({"reason"})),
    "mnist_rate_limited_total": ("counter", frozenset({"caller", "limit"})),
    "mnist_prediction_confidence": ("histogram", frozenset({"version"})),
    "mnist_input_mean_intensity": ("histogram", frozenset({"version"})),
    "mnist_input_ink_fraction": ("histogram", frozenset({"version"})),
    "mnist_class_mix_divergence": ("gauge", frozenset({"version"})),
    "mnist_confidence_divergence": ("gauge", frozenset({"version"})),
    "mnist_low_confidence_rate": ("gauge", frozenset({"version"})),
    "mnist_input_mean_intensity_divergence": ("gauge", frozenset({"version"})),
    "mnist_input_ink_fraction_divergence": ("gauge", frozenset({"version"})),
    "mnist_feedback_total": ("counter", frozenset({"version"})),
    "mnist_feedback_correct_total": ("counter", frozenset({"version"})),
    "mnist_feedback_labels_total": ("counter", frozenset({"result"})),
}
# Labels Prometheus itself attaches to every scraped series.
TARGET_LABELS = frozenset({"instance", "job"})


def series_labels() -> dict[str, frozenset[str]]:
    """Every series name a query may select, with the labels it carries."""
    series: dict[str, frozenset[str]] = {}
    for name, (kind, labels) in METRICS.items():
        if kind == "histogram":
            series[f"{name}_bucket"] = labels | {"le"}
            series[f"{name}_sum"] = labels
            series[f"{name}_count"] = labels
        else:
            series[name] = labels
    return series


# ---------------------------------------------------------------------------------------------
# Reading the files


_VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?::?[-?]([^}]*))?\}|\$(\w+)")


def interpolate(value: Any) -> Any:
    """Compose interpolation with every variable unset: `${VAR:-default}` -> default."""
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            if match.group(0) == "$$":
                return "$"
            return match.group(2) or ""

        return _VARIABLE.sub(substitute, value)
    if isinstance(value, list):
        return [interpolate(item) for item in value]
    if isinstance(value, dict):
        return {key: interpolate(item) for key, item in value.items()}
    return value


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = interpolate(load_yaml(COMPOSE_FILE))
    assert isinstance(loaded, dict)
    return loaded


def service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    services = compose["services"]
    assert name in services, f"docker-compose.yml has no service {name!r}"
    return dict(services[name])


def environment(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment", {})
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


@dataclass(frozen=True)
class Mount:
    type: str
    source: str
    target: str
    read_only: bool


def mounts(svc: dict[str, Any]) -> list[Mount]:
    """The service's volumes, short or long syntax, as one shape."""
    found = []
    for spec in svc.get("volumes", []):
        if isinstance(spec, str):
            parts = spec.split(":")
            source, target = parts[0], parts[1]
            options = parts[2].split(",") if len(parts) > 2 else []
            kind = "bind" if source.startswith((".", "/", "~")) else "volume"
            found.append(Mount(kind, source, target, "ro" in options))
        else:
            found.append(
                Mount(
                    spec["type"],
                    spec.get("source", ""),
                    spec["target"],
                    bool(spec.get("read_only", False)),
                )
            )
    return found


def command_args(svc: dict[str, Any]) -> list[str]:
    command = svc.get("command", [])
    return shlex.split(command) if isinstance(command, str) else [str(arg) for arg in command]


def flag_value(args: list[str], flag: str) -> str | None:
    for index, arg in enumerate(args):
        if arg == flag and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    parsed = parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))
    names = [stage.name for stage in parsed]
    assert len(names) == len(set(names)), f"duplicate stage names: {names}"
    return {stage.name: stage for stage in parsed}


@dataclass(frozen=True)
class Copy:
    from_stage: str | None
    sources: tuple[str, ...]
    destination: str


def copies(stage: Stage) -> list[Copy]:
    found = []
    for instruction in stage.all("COPY") + stage.all("ADD"):
        words = shlex.split(instruction.args)
        flags = [word for word in words if word.startswith("--")]
        paths = [word for word in words if not word.startswith("--")]
        if paths and paths[0].startswith("["):
            paths = json.loads(instruction.args[instruction.args.index("[") :])
        from_stage = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
        found.append(Copy(from_stage, tuple(paths[:-1]), paths[-1]))
    return found


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        regex, index = "", 0
        while index < len(pattern):
            if pattern.startswith("**/", index):
                regex, index = regex + "(?:.*/)?", index + 3
            elif pattern.startswith("**", index):
                regex, index = regex + ".*", index + 2
            elif pattern[index] == "*":
                regex, index = regex + "[^/]*", index + 1
            elif pattern[index] == "?":
                regex, index = regex + "[^/]", index + 1
            elif pattern[index] == "[":
                end = pattern.index("]", index)
                regex, index = regex + pattern[index : end + 1], end + 1
            else:
                regex, index = regex + re.escape(pattern[index]), index + 1
        rules.append((negate, re.compile(regex)))
    return rules


def dockerignored(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; a matched folder takes its contents."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for negate, regex in dockerignore_rules():
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


def load_pyproject() -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        pytest.skip("tomllib needs Python 3.11+")
    with (REPO / "pyproject.toml").open("rb") as stream:
        return tomllib.load(stream)


def lock_requirements(role: str) -> list[Requirement]:
    lines = (REPO / "requirements" / f"{role}.lock").read_text(encoding="utf-8").splitlines()
    return [
        Requirement(line) for line in lines if line.strip() and not line.lstrip().startswith("#")
    ]


def image_python_version(stages: dict[str, Stage]) -> str:
    roots = {chain(stages, name)[0].base for name in stages}
    assert len(roots) == 1, f"stages start from different images: {roots}"
    match = re.match(r"python:(3\.\d+)", roots.pop())
    assert match, "the base image is not python:3.X-..."
    return match.group(1)


# ---------------------------------------------------------------------------------------------
# Dockerfile and .dockerignore


def test_dockerfile_has_a_target_per_role_and_server_is_the_default(
    stages: dict[str, Stage],
) -> None:
    assert set(ROLES) <= set(stages)
    assert list(stages)[-1] == "server", "`docker build .` (the last stage) should give the server"


def test_every_stage_starts_from_a_pinned_official_slim_python(stages: dict[str, Stage]) -> None:
    pinned = re.compile(r"python:3\.\d+(\.\d+)?-slim-[a-z]+(@sha256:[0-9a-f]{64})?")
    for name in stages:
        root = chain(stages, name)[0].base
        assert pinned.fullmatch(root), f"stage {name} starts from {root!r}"


def test_final_images_run_as_a_non_root_user(stages: dict[str, Stage]) -> None:
    for role in ROLES:
        user = effective(stages, role, "USER")
        assert user, f"{role}: no USER, so it runs as root"
        assert user.split(":")[0] not in {"root", "0"}, f"{role}: USER {user}"


def test_final_images_hand_signals_to_python(stages: dict[str, Stage]) -> None:
    """Exec-form entrypoint (optionally behind tini), the role's console script, SIGTERM."""
    scripts = load_pyproject()["project"]["scripts"]
    for role in ROLES:
        entrypoint = effective(stages, role, "ENTRYPOINT")
        assert entrypoint, f"{role}: no ENTRYPOINT"
        argv = exec_form(entrypoint)
        if Path(argv[0]).name == "tini":
            assert argv[1] == "--", f"{role}: tini needs -- before the command"
            argv = argv[2:]
        assert argv[0] == ROLE_SCRIPTS[role], f"{role} runs {argv}"
        assert argv[0] in scripts, f"{argv[0]} is not a console script in pyproject.toml"
        assert effective(stages, role, "STOPSIGNAL") == "SIGTERM", role
        command = effective(stages, role, "CMD")
        if command:
            exec_form(command)


def test_server_image_healthcheck_uses_the_grpc_health_probe(stages: dict[str, Stage]) -> None:
    healthcheck = effective(stages, "server", "HEALTHCHECK")
    assert healthcheck, "the server image has no HEALTHCHECK"
    argv = exec_form(healthcheck[healthcheck.index("CMD") + len("CMD") :].strip())
    assert argv[:3] == ["mnist-client", "health", "--target"], argv


def test_final_images_copy_only_a_venv_built_from_the_role_lock(stages: dict[str, Stage]) -> None:
    build_tools = re.compile(r"\b(gcc|g\+\+|clang|build-essential|make|git|python3?-dev)\b")
    for role in ROLES:
        venv_stages = []
        for stage in chain(stages, role)[1:]:
            for run in stage.all("RUN"):
                assert not re.search(r"\bpip\b.*\b(install|wheel)\b", run.args), (
                    f"{role}: pip runs in a final stage ({stage.name}); install in a builder"
                )
                if "apt-get install" in run.args:
                    assert "--no-install-recommends" in run.args, run.args
                    assert "rm -rf /var/lib/apt/lists" in run.args, run.args
                    assert not build_tools.search(run.args), run.args
            for copy in copies(stage):
                assert copy.from_stage, f"{role}: copies {copy.sources} from the build context"
                assert copy.sources == ("/opt/venv",), f"{role}: copies {copy.sources}"
                venv_stages.append(copy.from_stage)
        assert len(venv_stages) == 1, f"{role}: venv copied from {venv_stages}"

        builder = chain(stages, venv_stages[0])
        locks = [s for stage in builder for c in copies(stage) for s in c.sources if ".lock" in s]
        assert locks == [f"requirements/{role}.lock"], f"{role} installs {locks}"
        installs = " ".join(run.args for stage in builder for run in stage.all("RUN"))
        extras = set(re.findall(r"mnist-serving\[([\w,]+)\]", installs))
        assert extras == {ROLE_EXTRAS[role]}, f"{role} installs mnist-serving[{extras}]"


def test_the_wheel_stage_copies_every_package_folder(stages: dict[str, Stage]) -> None:
    package_dirs = set(load_pyproject()["tool"]["setuptools"]["package-dir"].values())
    copied = {
        source.strip("/")
        for stage in stages.values()
        for copy in copies(stage)
        if copy.from_stage is None
        for source in copy.sources
    }
    assert package_dirs <= copied, f"not copied into the build: {package_dirs - copied}"
    assert {"pyproject.toml", "README.md"} <= copied  # setuptools reads both


def test_copy_sources_exist_and_are_in_the_build_context(stages: dict[str, Stage]) -> None:
    package_dirs = set(load_pyproject()["tool"]["setuptools"]["package-dir"].values())
    not_yet_here = []
    for stage in stages.values():
        for copy in copies(stage):
            if copy.from_stage:
                assert copy.from_stage in stages, f"COPY --from={copy.from_stage}: no such stage"
                continue
            for source in copy.sources:
                assert not dockerignored(source), f".dockerignore drops {source}, which is copied"
                if not (REPO / source).exists():
                    assert source.strip("/") in package_dirs, f"COPY {source}: no such path"
                    not_yet_here.append(source)
    if not_yet_here:
        pytest.skip(f"package folders not on this branch yet: {not_yet_here}")


def test_dockerignore_keeps_local_state_out_of_the_context() -> None:
    for path in [
        ".git/HEAD",
        ".venv/bin/python",
        "models/mnist/1/saved_model.pb",
        "data/mnist.npz",
        "server/__pycache__/app.cpython-311.pyc",
        ".mypy_cache/3.11/x.json",
        ".pytest_cache/v/cache",
        ".ruff_cache/x",
        "deploy/keys.json",
    ]:
        assert dockerignored(path), f"{path} would be sent to the Docker build"
    for path in ["pyproject.toml", "README.md", "requirements/server.lock", "server/app.py"]:
        assert not dockerignored(path), f"{path} is needed by the build"


# ---------------------------------------------------------------------------------------------
# Lock files


@pytest.mark.parametrize("role", ROLES)
def test_lock_pins_every_package(role: str) -> None:
    requirements = lock_requirements(role)
    assert requirements
    for requirement in requirements:
        specifiers = list(requirement.specifier)
        assert [s.operator for s in specifiers] == ["=="], str(requirement)


@pytest.mark.parametrize("role", ["client", "server"])
def test_lock_has_no_tensorflow(role: str) -> None:
    """The client never needs TensorFlow; the server image is the lean install (LiteRT)."""
    names = {canonicalize_name(r.name) for r in lock_requirements(role)}
    assert not names & TENSORFLOW_PACKAGES, names & TENSORFLOW_PACKAGES


@pytest.mark.parametrize("role", ROLES)
def test_lock_satisfies_pyproject(role: str, stages: dict[str, Stage]) -> None:
    """Every dependency of the role's install is pinned, at a version pyproject.toml allows."""
    project = load_pyproject()["project"]
    wanted = project["dependencies"] + project["optional-dependencies"][ROLE_EXTRAS[role]]
    python = image_python_version(stages)
    env: dict[str, str] = {key: str(value) for key, value in default_environment().items()}
    env.update(python_version=python, python_full_version=f"{python}.0", sys_platform="linux")
    pins = {
        canonicalize_name(r.name): next(iter(r.specifier)).version
        for r in lock_requirements(role)
        if r.marker is None or r.marker.evaluate(env)
    }
    for line in wanted:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{role}.lock lacks {name} (pyproject: {line})"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{role}.lock pins {name}=={pins[name]}, pyproject wants {line}: run {LOCK_SCRIPT.name}"
        )


def test_locks_are_resolved_for_the_image_python(stages: dict[str, Stage]) -> None:
    match = re.search(r"^PYTHON_VERSION=(\S+)$", LOCK_SCRIPT.read_text(encoding="utf-8"), re.M)
    assert match, "requirements/lock.sh sets no PYTHON_VERSION"
    assert match.group(1) == image_python_version(stages)


# ---------------------------------------------------------------------------------------------
# docker-compose.yml


def test_compose_has_the_four_services(compose: dict[str, Any]) -> None:
    assert {"trainer", "server", "prometheus", "grafana"} <= set(compose["services"])


def test_server_starts_after_the_trainer_succeeded(compose: dict[str, Any]) -> None:
    depends_on = service(compose, "server")["depends_on"]
    assert isinstance(depends_on, dict), "depends_on needs the long form to carry a condition"
    assert depends_on["trainer"]["condition"] == "service_completed_successfully"


def test_trainer_is_a_one_shot_job(compose: dict[str, Any]) -> None:
    trainer = service(compose, "trainer")
    assert str(trainer.get("restart", "no")) == "no"
    assert not trainer.get("profiles"), "`docker compose up` must run the trainer"
    for bind in (m for m in mounts(trainer) if m.type == "bind"):
        assert bind.read_only, f"the trainer's data mount {bind.target} should be read-only"


def test_models_volume_trainer_writes_and_server_reads(compose: dict[str, Any]) -> None:
    assert "models" in (compose.get("volumes") or {}), "no top-level named volume `models`"
    trainer, server = service(compose, "trainer"), service(compose, "server")
    [trainer_mount] = [m for m in mounts(trainer) if m.source == "models"]
    [server_mount] = [m for m in mounts(server) if m.source == "models"]
    assert trainer_mount.type == server_mount.type == "volume"
    assert not trainer_mount.read_only, "the trainer must be able to export into the volume"
    assert server_mount.read_only, "the server should mount the models read-only"

    # Both sides must mean the same folder inside the volume.
    exported = flag_value(command_args(trainer), "--model-dir")
    served = environment(server).get("MNIST_SERVING_MODEL_DIR")
    assert exported, "the trainer command has no --model-dir"
    assert served, "the server has no MNIST_SERVING_MODEL_DIR"
    assert Path(exported).is_relative_to(trainer_mount.target), exported
    assert Path(served).is_relative_to(server_mount.target), served
    assert Path(exported).relative_to(trainer_mount.target) == Path(served).relative_to(
        server_mount.target
    )


def test_server_publishes_grpc_and_http_ports(compose: dict[str, Any]) -> None:
    server = service(compose, "server")
    published = set()
    for port in server.get("ports", []):
        if isinstance(port, dict):
            published.add((str(port.get("published")), str(port["target"])))
        else:
            *host, container = str(port).split(":")
            published.add((host[-1] if host else container, container.split("/")[0]))
    assert ("8500", "8500") in published, published
    assert ("8501", "8501") in published, published
    env = environment(server)
    assert env.get("MNIST_SERVING_PORT", "8500") == "8500"
    assert env.get("MNIST_SERVING_HTTP_PORT", "8501") == "8501"
    # /metrics is on the HTTP port; a separate metrics listener would need its own mapping.
    assert "MNIST_SERVING_METRICS_PORT" not in env


def test_server_healthcheck_asks_the_grpc_health_service(compose: dict[str, Any]) -> None:
    server = service(compose, "server")
    test = server["healthcheck"]["test"]
    assert isinstance(test, list), "healthcheck.test: use the exec form, [CMD, ...]"
    argv = test[1:] if test[0] == "CMD" else shlex.split(test[1])
    port = environment(server).get("MNIST_SERVING_PORT", "8500")
    assert argv == ["mnist-client", "health", "--target", f"localhost:{port}"], test
    for key in ("interval", "timeout", "retries", "start_period"):
        assert key in server["healthcheck"], f"healthcheck without {key}"


def test_server_restarts_and_stops_gracefully(compose: dict[str, Any]) -> None:
    server = service(compose, "server")
    assert server.get("restart") in {"unless-stopped", "on-failure", "always"}
    assert server.get("stop_signal", "SIGTERM") == "SIGTERM"
    assert "stop_grace_period" in server, "no stop_grace_period: Docker kills after 10s"
    env = environment(server)
    drain = float(env.get("MNIST_SERVING_DRAIN_DELAY", "0"))
    grace = float(env.get("MNIST_SERVING_GRACE_PERIOD", "10"))  # the server's defaults
    assert drain > 0, "no MNIST_SERVING_DRAIN_DELAY: clients see refusals the moment it stops"
    # The server stops within drain + grace + about a second for streams to close.
    stop = seconds(server["stop_grace_period"])
    assert stop >= drain + grace + 2, (
        f"Docker would SIGKILL mid-drain ({stop} s < {drain + grace} s)"
    )


def test_server_polls_for_new_versions(compose: dict[str, Any]) -> None:
    interval = environment(service(compose, "server")).get("MNIST_SERVING_POLL_INTERVAL")
    assert interval is not None, "no MNIST_SERVING_POLL_INTERVAL"
    assert 0 < float(interval) <= 60, interval


def test_compose_builds_targets_that_exist(compose: dict[str, Any]) -> None:
    built = {}
    for name, svc in compose["services"].items():
        build = svc.get("build")
        if build is None:
            continue
        if isinstance(build, str):
            build = {"context": build}
        context = REPO / build.get("context", ".")
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        assert context.is_dir(), f"{name}: build context {context} missing"
        assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
        targets = {stage.name for stage in parse_dockerfile(dockerfile.read_text("utf-8"))}
        assert build.get("target") in targets, f"{name}: target {build.get('target')!r}"
        built[name] = build["target"]
    assert built.get("trainer") == "trainer", built
    assert built.get("server") == "server", built


def test_compose_bind_mounts_exist_in_the_repo(compose: dict[str, Any]) -> None:
    binds = [m for svc in compose["services"].values() for m in mounts(svc) if m.type == "bind"]
    assert binds
    for bind in binds:
        assert not Path(bind.source).is_absolute(), f"{bind.source}: keep paths repo-relative"
        assert (REPO / bind.source).exists(), f"bind mount source {bind.source} missing"


def test_third_party_images_are_official_and_pinned(compose: dict[str, Any]) -> None:
    expected = {"prometheus": "prom/prometheus", "grafana": "grafana/grafana"}
    for name, repository in expected.items():
        image = service(compose, name)["image"]
        name_part, _, tag = image.partition(":")
        assert name_part == repository, image
        assert re.fullmatch(r"v?\d+\.\d+\.\d+(@sha256:[0-9a-f]{64})?", tag), f"unpinned: {image}"


def test_prometheus_runs_the_repo_config(compose: dict[str, Any]) -> None:
    prometheus = service(compose, "prometheus")
    config = flag_value(command_args(prometheus), "--config.file") or (
        "/etc/prometheus/prometheus.yml"
    )
    sources = {m.target: m.source for m in mounts(prometheus)}
    assert config in sources, f"{config} is not mounted"
    assert (REPO / sources[config]).resolve() == PROMETHEUS_CONFIG


def test_grafana_is_provisioned_from_the_repo(compose: dict[str, Any]) -> None:
    sources = {(REPO / m.source).resolve(): m.target for m in mounts(service(compose, "grafana"))}
    assert sources.get(GRAFANA / "provisioning") == "/etc/grafana/provisioning"
    dashboards_target = sources.get(GRAFANA / "dashboards")
    assert dashboards_target, "deploy/grafana/dashboards is not mounted"

    providers = [
        provider
        for path in sorted((GRAFANA / "provisioning" / "dashboards").glob("*.yml"))
        for provider in load_yaml(path)["providers"]
    ]
    assert [p["options"]["path"] for p in providers] == [dashboards_target]

    datasources = [
        source
        for path in sorted((GRAFANA / "provisioning" / "datasources").glob("*.yml"))
        for source in load_yaml(path)["datasources"]
    ]
    [prometheus] = [d for d in datasources if d["type"] == "prometheus"]
    assert prometheus["url"] == "http://prometheus:9090"


def test_api_keys_come_from_a_compose_secret_only_when_added(compose: dict[str, Any]) -> None:
    """docker-compose.auth.yml turns keys on with a secret file; the base file leaves them off."""
    settings = import_or_skip("mnist_serving.server.settings")
    assert "MNIST_SERVING_AUTH_KEYS" not in environment(service(compose, "server"))
    auth = interpolate(load_yaml(COMPOSE_AUTH_FILE))
    server = auth["services"]["server"]
    [secret] = server["secrets"]
    path = environment(server)["MNIST_SERVING_AUTH_KEYS"]
    assert path == f"/run/secrets/{secret['target']}"  # where compose mounts a secret
    assert "auth_keys" in settings.Settings.model_fields  # the variable is a real setting
    assert auth["secrets"][secret["source"]]["file"] == "./deploy/keys.json"
    assert dockerignored("deploy/keys.json")
    assert set(auth["services"]) <= set(compose["services"])  # it overrides, adds no service


def test_compose_file_validates() -> None:
    """`docker compose config` checks the file against the Compose schema, no engine needed
    (the base file alone, and with the API keys file over it)."""
    for argv in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(argv[0]) is None:
            continue
        probe = subprocess.run([*argv, "version"], capture_output=True, text=True, check=False)
        if probe.returncode != 0:
            continue
        for files in ([COMPOSE_FILE], [COMPOSE_FILE, COMPOSE_AUTH_FILE]):
            result = subprocess.run(
                [*argv, "--profile", "tools", *(f"-f={f}" for f in files), "config", "--quiet"],
                capture_output=True,
                text=True,
                check=False,
                cwd=REPO,
                env={**os.environ, "MNIST_KEYS_FILE": str(COMPOSE_FILE)},  # any existing file
            )
            assert result.returncode == 0, result.stderr
        return
    pytest.skip("neither `docker compose` nor `docker-compose` is installed")


# ---------------------------------------------------------------------------------------------
# Prometheus


def test_promtool_accepts_the_scrape_config() -> None:
    result = subprocess.run(
        [promtool(), "check", "config", str(PROMETHEUS_CONFIG)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_the_server_http_port(compose: dict[str, Any]) -> None:
    config = load_yaml(PROMETHEUS_CONFIG)
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "mnist-serving"]
    interval = job.get("scrape_interval", config.get("global", {}).get("scrape_interval", "1m"))
    assert seconds(interval) <= 15, interval
    port = environment(service(compose, "server")).get("MNIST_SERVING_HTTP_PORT", "8501")
    targets = [t for static in job.get("static_configs", []) for t in static["targets"]]
    assert targets == [f"server:{port}"], targets
    assert job.get("metrics_path", "/metrics") == "/metrics"


# ---------------------------------------------------------------------------------------------
# Grafana dashboard


def test_dashboard_is_valid_json_with_unique_panel_ids() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["uid"]
    assert dashboard["title"]
    ids = [panel["id"] for panel in dashboard_panels()]
    assert len(ids) == len(set(ids)), ids
    assert dashboard_exprs()


def test_dashboard_queries_the_provisioned_datasource() -> None:
    [datasource] = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")[
        "datasources"
    ]
    for panel in dashboard_panels():
        if panel.get("type") == "row":
            continue
        for holder in [panel, *panel.get("targets", [])]:
            assert holder.get("datasource") == {"type": "prometheus", "uid": datasource["uid"]}, (
                f"{panel['title']}: datasource {holder.get('datasource')}"
            )


def test_dashboard_queries_use_only_the_server_metrics() -> None:
    known = series_labels()
    for expr in dashboard_exprs():
        series, labels = promql_names(expr)
        assert series, f"selects no metric: {expr}"
        unknown = series - set(known)
        assert not unknown, f"unknown metric {unknown} in {expr}"
        allowed = TARGET_LABELS.union(*(known[name] for name in series))
        assert labels <= allowed, f"unknown label {labels - allowed} in {expr}"


def test_dashboard_shows_the_required_views() -> None:
    exprs = dashboard_exprs()

    def shown(pattern: str) -> bool:
        return any(re.search(pattern, expr) for expr in exprs)

    for quantile in ("0.5", "0.9", "0.99"):
        assert shown(rf"histogram_quantile\({quantile}, .*mnist_request_duration_seconds_bucket")
    assert shown(r"rate\(mnist_images_predicted_total\[1m\]\)")
    assert shown(r"rate\(mnist_requests_total\[1m\]\)")
    assert shown(r'mnist_requests_total\{code!="OK"\}.*/.*mnist_requests_total'), "error ratio"
    assert shown(r"mnist_batch_size_images_sum.*/.*mnist_batch_size_images_count")
    gauges = ("mnist_batch_queue_depth", "mnist_requests_in_flight", "mnist_model_version_info")
    for gauge in gauges:
        assert shown(gauge), gauge
    # Online against batch: latency per class (the quantile taken per class, not overall)
    # and the calls each class had shed.
    for quantile in ("0.5", "0.99"):
        assert shown(
            rf"histogram_quantile\({quantile}, sum by \(le, priority\) "
            r"\(rate\(mnist_request_duration_seconds_bucket"
        ), f"p{quantile} by priority"
    assert shown(r"sum by \(priority\) \(rate\(mnist_requests_shed_total\[1m\]\)\)")


def test_histogram_quantiles_keep_the_le_label() -> None:
    for expr in dashboard_exprs():
        for inner in re.findall(r"histogram_quantile\(([^,]+),(.*)", expr):
            assert "_bucket" in inner[1], expr
            grouping = GROUPING.search(inner[1])
            assert grouping, f"aggregate `by (le)`: {expr}"
            assert grouping.group(1) == "by", f"aggregate `by (le)`: {expr}"
            assert "le" in [label.strip() for label in grouping.group(2).split(",")], expr


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{index}", "expr": expr}
                    for index, expr in enumerate(dashboard_exprs())
                ],
            }
        ]
    }
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    result = subprocess.run(
        [promtool(), "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_error_ratio_and_batch_size_queries_compute_what_they_say(tmp_path: Path) -> None:
    """Fed known counters, Prometheus's own evaluator gives the expected ratio and mean."""
    exprs = dashboard_exprs()
    [error_ratio] = [e for e in exprs if 'code!="OK"' in e]
    [batch_size] = [e for e in exprs if "mnist_batch_size_images_sum" in e]
    requests = 'mnist_requests_total{{api="native",method="Predict",code="{}"}}'
    tests = {
        "tests": [
            {
                "interval": "15s",
                "input_series": [
                    # Per 15s: 30 OK and 10 failed requests; 10 model calls of 32 images.
                    {"series": requests.format("OK"), "values": "0+30x40"},
                    {"series": requests.format("INVALID_ARGUMENT"), "values": "0+10x40"},
                    {"series": "mnist_batch_size_images_sum", "values": "0+320x40"},
                    {"series": "mnist_batch_size_images_count", "values": "0+10x40"},
                ],
                "promql_expr_test": [
                    {"expr": error_ratio, "eval_time": "5m", "exp_samples": [{"value": 0.25}]},
                    {"expr": batch_size, "eval_time": "5m", "exp_samples": [{"value": 32}]},
                ],
            }
        ]
    }
    path = tmp_path / "tests.yml"
    path.write_text(yaml.safe_dump(tests), encoding="utf-8")
    result = subprocess.run(
        [promtool(), "test", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# Against the code, once trainer/, server/ and client/ are on the same branch


def test_dashboard_metrics_are_exported_by_the_server() -> None:
    metrics = import_or_skip("mnist_serving.server.metrics")
    from prometheus_client import REGISTRY
    from prometheus_client.metrics import MetricWrapperBase

    families = [
        family
        for value in vars(metrics).values()
        if isinstance(value, MetricWrapperBase)
        for family in value.describe()
    ] + list(REGISTRY.collect())
    suffixes = {
        "counter": ("_total",),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count"),
        "info": ("_info",),
    }
    exported = {
        family.name.removesuffix("_total") + suffix
        for family in families
        for suffix in suffixes.get(family.type, ("",))
    }
    if not any(name.startswith("mnist_") for name in exported):
        pytest.skip("mnist_serving.server.metrics defines no metric at import time")
    used = set().union(*(promql_names(expr)[0] for expr in dashboard_exprs()))
    assert used <= exported, f"the dashboard queries metrics the server lacks: {used - exported}"


def test_compose_flags_and_env_exist_in_the_cli(compose: dict[str, Any]) -> None:
    trainer_help = help_text("mnist_serving.trainer.__main__", "mnist-train", "--help")
    for arg in command_args(service(compose, "trainer")):
        if arg.startswith("--"):
            assert mentions(trainer_help, arg), f"mnist-train has no {arg}"
    serve_help = help_text("mnist_serving.server.__main__", "mnist-serve", "--help")
    for name in environment(service(compose, "server")):
        flag = "--" + name.removeprefix("MNIST_SERVING_").lower().replace("_", "-")
        assert mentions(serve_help, flag), f"{name}: mnist-serve has no {flag}"
    health_help = help_text("mnist_serving.client.__main__", "mnist-client", "health", "--help")
    assert mentions(health_help, "--target")
