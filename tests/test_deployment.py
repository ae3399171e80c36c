"""The container deployment (docker/) and the README's generated settings table.

No Docker engine is needed: the compose files are read with PyYAML and the Dockerfile with
a small instruction parser, and the image's HEALTHCHECK command is run here, with this
Python, against a real server. Where a ``docker compose`` (or ``docker-compose``) binary is
on PATH, the compose files are also rendered by it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from lossd_server.config import Settings
from lossd_server.embedded import EmbeddedServer

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
COMPOSE_CPU = DOCKER / "compose.cpu.yaml"
COMPOSE_TLS = DOCKER / "compose.tls.yaml"
COMPOSE_TOKENS = DOCKER / "compose.tokens.yaml"
COMPOSE_FILES = (COMPOSE, COMPOSE_CPU, COMPOSE_TOKENS, COMPOSE_TLS)
# compose.yaml, then the overrides in the documented order (cpu, tokens, tls); each must still validate.
COMBINATIONS = [
    (COMPOSE,),
    (COMPOSE, COMPOSE_CPU),
    (COMPOSE, COMPOSE_TOKENS),
    (COMPOSE, COMPOSE_TLS),
    (COMPOSE, COMPOSE_TOKENS, COMPOSE_TLS),
    (COMPOSE, COMPOSE_CPU, COMPOSE_TOKENS),
    (COMPOSE, COMPOSE_CPU, COMPOSE_TOKENS, COMPOSE_TLS),
]
TOKEN_SECRET = "lossd_tokens"
# Settings that name a file inside the container, which compose.yaml alone cannot provide.
FILE_SETTINGS = ("LOSSD_TOKEN_FILE", "LOSSD_TLS_CERT", "LOSSD_TLS_KEY", "LOSSD_TLS_CLIENT_CA")
SERVER_GRACE_PROMISE = 10.0  # seconds: the server stops within this by default
SERVICE = "lossd"
LOSSD_VARIABLE = re.compile(r"\bLOSSD_[A-Z0-9_]+\b")
HEALTHCHECK_TIMEOUT = 60


# --- a small Dockerfile parser ------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str  # continuation lines joined as Docker joins them

    @property
    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction, else None (shell form)."""
        if self.args.startswith("["):
            try:
                parsed = json.loads(self.args)
            except json.JSONDecodeError:
                return None
            if isinstance(parsed, list) and all(isinstance(item, str) for item in parsed):
                return parsed
        return None


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions in order. Comments and blank lines are dropped, also inside continuations;
    a line ending in a backslash continues on the next (the backslash and newline vanish)."""
    instructions: list[Instruction] = []
    pending = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1]
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
    assert not pending, f"{path}: the last instruction ends in a line continuation"
    return instructions


def of(instructions: list[Instruction], keyword: str) -> list[Instruction]:
    return [instruction for instruction in instructions if instruction.keyword == keyword]


def key_values(args: str) -> dict[str, str]:
    """``ENV``/``ARG``/``LABEL`` arguments: ``K=V K2="V 2"``, or the legacy ``ENV K V``."""
    words = shlex.split(args)
    if all("=" in word for word in words):
        return dict(word.split("=", 1) for word in words)
    return {words[0]: " ".join(words[1:])}


def image_env(instructions: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in of(instructions, "ENV"):
        env.update(key_values(instruction.args))
    return env


def healthcheck_command(instructions: list[Instruction]) -> list[str]:
    (check,) = of(instructions, "HEALTHCHECK")
    words = check.args.split(" ", 1)
    while words[0].startswith("--"):
        words = words[1].strip().split(" ", 1)
    assert words[0].upper() == "CMD", f"HEALTHCHECK must run a command: {check.args}"
    command = Instruction("CMD", words[1].strip())
    exec_form = command.exec_form
    return exec_form if exec_form is not None else ["/bin/sh", "-c", command.args]


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


# --- compose files ------------------------------------------------------------------------


class Reset:
    """Compose's ``!reset`` / ``!override`` tags: replace what the files before set."""

    def __init__(self, value: Any) -> None:
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    pass


def _tagged(loader: yaml.SafeLoader, node: yaml.Node) -> Reset:
    if isinstance(node, yaml.SequenceNode):
        return Reset(loader.construct_sequence(node, deep=True))
    if isinstance(node, yaml.MappingNode):
        return Reset(loader.construct_mapping(node, deep=True))
    return Reset(loader.construct_scalar(node))  # type: ignore[arg-type]


ComposeLoader.add_constructor("!reset", _tagged)
ComposeLoader.add_constructor("!override", _tagged)


def load_compose(path: Path) -> dict[str, Any]:
    loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=ComposeLoader)
    assert isinstance(loaded, dict), f"{path} is not a mapping"
    return loaded


def merge(base: Any, override: Any) -> Any:
    """Compose's merge, as far as these files need it: mappings merge, lists append uniquely."""
    if isinstance(override, Reset):
        return override.value
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = merge(base[key], value) if key in base else merge(None, value)
        return merged
    if isinstance(base, list) and isinstance(override, list):
        return base + [item for item in override if item not in base]
    if isinstance(override, dict):
        return {key: merge(None, value) for key, value in override.items()}
    return override


def compose(*paths: Path) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for path in paths:
        merged = merge(merged, load_compose(path))
    return merged


def with_defaults(value: str) -> str:
    """Interpolate ``${VAR:-default}`` / ``${VAR-default}`` / ``${VAR}`` with defaults only (no environment)."""
    return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda match: match.group(2) or "", value)


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(key): str(value) for key, value in env.items()}


def devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    reservations = ((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}
    return list(reservations.get("devices") or [])


def duration_seconds(text: str) -> float:
    """Compose durations: ``30s``, ``1m30s``, ``1h``, ``500ms``, ``2us``."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", text)
    assert parts and "".join(number + unit for number, unit in parts) == text, f"not a duration: {text!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE)


@pytest.fixture(scope="module")
def gpu() -> dict[str, Any]:
    service: dict[str, Any] = compose(COMPOSE)["services"][SERVICE]
    return service


# --- the Dockerfile -----------------------------------------------------------------------


def test_base_image_is_a_cuda_pytorch_runtime(dockerfile: list[Instruction]) -> None:
    (stage,) = of(dockerfile, "FROM")
    image = stage.args
    for instruction in of(dockerfile, "ARG"):
        for name, default in key_values(instruction.args).items():
            image = image.replace(f"${{{name}}}", default).replace(f"${name}", default)
    match = re.fullmatch(r"pytorch/pytorch:(\d+)\.(\d+)\.\d+-cuda[\d.]+-cudnn\d+-runtime", image)
    assert match, f"expected an official pytorch/pytorch CUDA runtime tag, got {image!r}"
    assert (int(match[1]), int(match[2])) >= (2, 1), f"{image}: the project needs torch >= 2.1"


def test_install_keeps_the_base_images_torch(dockerfile: list[Instruction]) -> None:
    runs = " ".join(instruction.args for instruction in of(dockerfile, "RUN"))
    assert re.search(r"pip install .*--constraint (\S+)", runs), "pip must install under a constraint pinning torch"
    assert "version('torch')" in runs and "torch==" in runs, "the constraint must pin the base image's torch"
    for segment in re.findall(r"pip install ([^&;]*)", runs):
        words = shlex.split(segment)
        requirements = [
            word
            for i, word in enumerate(words)
            if not word.startswith("-") and words[i - 1] not in ("--constraint", "-c", "-r", "--requirement")
        ]
        assert requirements, f"nothing to install in: pip install {segment}"
        for requirement in requirements:
            assert not re.match(r"torch\b", requirement), f"pip must not be asked for torch itself: {requirement}"


def test_image_runs_as_a_non_root_user(dockerfile: list[Instruction]) -> None:
    users = of(dockerfile, "USER")
    assert users, "the image must set USER"
    user, _, group = users[-1].args.partition(":")
    assert user not in ("root", "0"), f"the image runs as {users[-1].args}"
    assert group not in ("root", "0"), f"the image runs with group {group}"
    last_user = max(i for i, instruction in enumerate(dockerfile) if instruction.keyword == "USER")
    entrypoint = max(i for i, instruction in enumerate(dockerfile) if instruction.keyword == "ENTRYPOINT")
    assert last_user < entrypoint
    created = " ".join(instruction.args for instruction in of(dockerfile, "RUN"))
    assert re.search(rf"useradd .*--uid {re.escape(user)}\b", created), f"no user with uid {user} is created"


def test_image_defaults_and_entrypoint(dockerfile: list[Instruction]) -> None:
    env = image_env(dockerfile)
    assert env["LOSSD_HOST"] == "0.0.0.0"
    assert env["LOSSD_STATE_DIR"] == "/var/lib/lossd"
    assert env["LOSSD_METRICS_PORT"] == "9090"
    exposed = {port.split("/")[0] for instruction in of(dockerfile, "EXPOSE") for port in instruction.args.split()}
    assert {str(Settings.model_fields["port"].default), env["LOSSD_METRICS_PORT"]} <= exposed
    (entrypoint,) = of(dockerfile, "ENTRYPOINT")
    assert entrypoint.exec_form == ["lossd", "serve"], "exec form, so lossd is PID 1 and gets SIGTERM"


def test_state_dir_is_a_volume_owned_by_the_user(dockerfile: list[Instruction]) -> None:
    state_dir = image_env(dockerfile)["LOSSD_STATE_DIR"]
    volumes = [
        path for instruction in of(dockerfile, "VOLUME") for path in (instruction.exec_form or instruction.args.split())
    ]
    assert state_dir in volumes
    keywords = [instruction.keyword for instruction in dockerfile]
    chown = next(
        i
        for i, instruction in enumerate(dockerfile)
        if instruction.keyword == "RUN" and re.search(rf"chown \S+ {re.escape(state_dir)}\b", instruction.args)
    )
    # Changes to a path after VOLUME declares it are discarded, so the chown must come first.
    assert chown < keywords.index("VOLUME")


def test_the_local_socket_is_on_a_shared_volume_the_server_can_bind_in(
    gpu: dict[str, Any], dockerfile: list[Instruction]
) -> None:
    """Trainer containers reach the local transport through a named volume holding the socket; the image
    creates its mount point owned by the server's user, which a fresh named volume inherits."""
    socket_dir = str(Path(environment(gpu)["LOSSD_LOCAL_SOCKET"]).parent)
    mounts = [volume.split(":")[:2] for volume in gpu.get("volumes") or [] if isinstance(volume, str)]
    named = [source for source, target in mounts if target == socket_dir]
    assert named and named[0] in (compose(COMPOSE).get("volumes") or {}), f"no named volume at {socket_dir}"
    assert "ipc" not in gpu, "the memfd travels over the socket: no shared IPC namespace is needed"
    assert any(
        instruction.keyword == "RUN" and re.search(rf"chown \S+ [^&]*{re.escape(socket_dir)}\b", instruction.args)
        for instruction in dockerfile
    ), f"the image does not create {socket_dir} owned by the server's user"


def test_copy_sources_exist_and_are_not_dockerignored(dockerfile: list[Instruction]) -> None:
    ignored = dockerignore_patterns()
    copies = of(dockerfile, "COPY") + of(dockerfile, "ADD")
    assert copies
    for instruction in copies:
        words = instruction.exec_form or [word for word in instruction.args.split() if not word.startswith("--")]
        for source in words[:-1]:
            assert (ROOT / source).exists(), f"COPY source {source} does not exist in the build context"
            assert source not in ignored and source.rstrip("/") not in ignored, f"{source} is in .dockerignore"
    # The package sources the HEALTHCHECK module lives in are copied.
    module = healthcheck_command(dockerfile)[2]
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    copied = [ROOT / word for instruction in copies for word in instruction.args.split()[:-1]]
    assert any(Path(spec.origin).resolve().is_relative_to(path.resolve()) for path in copied)


def test_dockerignore_keeps_junk_out_of_the_build_context() -> None:
    ignored = dockerignore_patterns()
    for pattern in (".git", ".venv", ".pytest_cache", ".mypy_cache", "*.egg-info", "build", "dist", "docker/tokens"):
        assert pattern in ignored, f".dockerignore should exclude {pattern}"


# --- the health check ---------------------------------------------------------------------


def _run_healthcheck(dockerfile: list[Instruction], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = healthcheck_command(dockerfile)
    assert command[0] == "python", f"the health check should run the image's python: {command}"
    base = {key: value for key, value in os.environ.items() if not key.startswith("LOSSD_")}
    return subprocess.run(
        [sys.executable, *command[1:]],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=HEALTHCHECK_TIMEOUT,
        check=False,
    )


def _image_env_for_tests(dockerfile: list[Instruction], tmp_path: Path) -> dict[str, str]:
    """The image's LOSSD_* defaults, with the state directory moved somewhere writable."""
    env = {key: value for key, value in image_env(dockerfile).items() if key.startswith("LOSSD_")}
    env["LOSSD_STATE_DIR"] = str(tmp_path / "state")
    return env


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_healthcheck_passes_against_a_serving_server(dockerfile: list[Instruction], tmp_path: Path) -> None:
    settings = Settings(host="127.0.0.1", port=0, device="cpu", store="memory")
    with EmbeddedServer(settings) as server:
        port = server.target.rsplit(":", 1)[1]
        result = _run_healthcheck(dockerfile, {**_image_env_for_tests(dockerfile, tmp_path), "LOSSD_PORT": port})
    assert result.returncode == 0, result.stderr
    assert "SERVING" in result.stdout


def test_healthcheck_fails_against_a_closed_port(dockerfile: list[Instruction], tmp_path: Path) -> None:
    port = _free_port()
    result = _run_healthcheck(dockerfile, {**_image_env_for_tests(dockerfile, tmp_path), "LOSSD_PORT": str(port)})
    assert result.returncode != 0
    assert "UNAVAILABLE" in result.stderr


@pytest.fixture()
def health_server() -> Iterator[tuple[grpc.Server, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    yield server, servicer
    server.stop(None)


def test_healthcheck_fails_when_not_serving(
    dockerfile: list[Instruction], tmp_path: Path, health_server: tuple[grpc.Server, health.HealthServicer]
) -> None:
    server, servicer = health_server
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    result = _run_healthcheck(dockerfile, {**_image_env_for_tests(dockerfile, tmp_path), "LOSSD_PORT": str(port)})
    assert result.returncode != 0
    assert "NOT_SERVING" in result.stderr


def _self_signed(tmp_path: Path, name: str) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    command = [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    command += ["-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}"]
    command += ["-addext", f"subjectAltName=DNS:{name}"]
    subprocess.run(
        command,
        check=True,
        capture_output=True,
        timeout=30,
    )
    return cert, key


def test_healthcheck_speaks_tls_when_the_server_does(dockerfile: list[Instruction], tmp_path: Path) -> None:
    # The certificate names a host other than the loopback address the check connects to.
    cert, key = _self_signed(tmp_path, "lossd.internal")
    settings = Settings(host="127.0.0.1", port=0, device="cpu", store="memory", tls_cert=cert, tls_key=key)
    tls = {"LOSSD_TLS_CERT": str(cert), "LOSSD_TLS_KEY": str(key)}
    with EmbeddedServer(settings) as server:
        env = {**_image_env_for_tests(dockerfile, tmp_path), "LOSSD_PORT": server.target.rsplit(":", 1)[1]}
        result = _run_healthcheck(dockerfile, {**env, **tls})
        plaintext = _run_healthcheck(dockerfile, env)
    assert result.returncode == 0, result.stderr
    assert plaintext.returncode != 0, "without LOSSD_TLS_CERT the check must not reach a TLS-only server"


# --- compose ------------------------------------------------------------------------------


def test_gpu_reservation(gpu: dict[str, Any]) -> None:
    (device,) = devices(gpu)
    assert device["driver"] == "nvidia"
    assert device["capabilities"] == ["gpu"]
    count = with_defaults(str(device["count"]))
    assert count == "all" or int(count) >= 1, f"count {device['count']!r}"
    assert environment(gpu)["LOSSD_DEVICE"].startswith("cuda")


def test_state_volume_is_named_and_mounted_at_the_state_dir(gpu: dict[str, Any], dockerfile: list[Instruction]) -> None:
    declared = compose(COMPOSE).get("volumes") or {}
    state_dir = environment(gpu).get("LOSSD_STATE_DIR", image_env(dockerfile)["LOSSD_STATE_DIR"])
    assert state_dir == image_env(dockerfile)["LOSSD_STATE_DIR"]
    mounts = []
    for volume in gpu.get("volumes") or []:
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume.get("source", ""), volume["target"]
        mounts.append((source, target))
    named = [source for source, target in mounts if target == state_dir]
    assert named, f"nothing is mounted at {state_dir}"
    assert named[0] in declared, f"volume {named[0]!r} is not declared under volumes:"


def test_ports_publish_on_loopback_by_default(gpu: dict[str, Any], dockerfile: list[Instruction]) -> None:
    metrics = environment(gpu).get("LOSSD_METRICS_PORT", image_env(dockerfile).get("LOSSD_METRICS_PORT"))
    grpc_port = environment(gpu).get("LOSSD_PORT", str(Settings.model_fields["port"].default))
    published = {}
    for port in gpu["ports"]:
        assert isinstance(port, str), "short syntax: HOST_IP:HOST_PORT:CONTAINER_PORT"
        assert "${" in port.split(":")[0], f"{port}: the bind address should come from a variable"
        host_ip, _, container = with_defaults(port).split(":")
        published[container] = host_ip
    assert published == {grpc_port: "127.0.0.1", metrics: "127.0.0.1"}


def test_stop_grace_period_outlasts_the_servers_grace(gpu: dict[str, Any]) -> None:
    grace = float(environment(gpu).get("LOSSD_GRACE_SECONDS", Settings.model_fields["grace_seconds"].default))
    assert grace <= SERVER_GRACE_PROMISE, f"LOSSD_GRACE_SECONDS={grace}: shutdown is promised within 10 s"
    assert duration_seconds(str(gpu["stop_grace_period"])) >= grace + 5


def test_restart_policy(gpu: dict[str, Any]) -> None:
    assert gpu["restart"] in ("always", "unless-stopped", "on-failure")


def test_build_context_and_dockerfile_exist(gpu: dict[str, Any]) -> None:
    build = gpu["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == ROOT, "the build context must be the repository root"
    assert (context / build["dockerfile"]).resolve() == DOCKERFILE


def test_every_lossd_variable_is_a_setting() -> None:
    fields = set(Settings.model_fields)
    for path in (DOCKERFILE, *COMPOSE_FILES):
        for name in LOSSD_VARIABLE.findall(path.read_text(encoding="utf-8")):
            field = name.removeprefix("LOSSD_").lower()
            assert field in fields, f"{path.name}: {name} is not a Settings field (no Settings.{field})"


@pytest.mark.parametrize("files", COMBINATIONS, ids=lambda files: "+".join(path.stem for path in files))
def test_environment_is_valid_settings(
    files: tuple[Path, ...], dockerfile: list[Instruction], monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in [key for key in os.environ if key.startswith("LOSSD_")]:
        monkeypatch.delenv(key)
    for key, value in {**image_env(dockerfile), **environment(compose(*files)["services"][SERVICE])}.items():
        if key.startswith("LOSSD_"):
            monkeypatch.setenv(key, with_defaults(value))
    Settings()  # the server would refuse to start on a value it cannot parse


def _secrets_attached(service: dict[str, Any]) -> set[str]:
    return {item if isinstance(item, str) else item["source"] for item in service.get("secrets") or []}


@pytest.mark.parametrize("files", COMBINATIONS, ids=lambda files: "+".join(path.stem for path in files))
def test_secret_files_are_declared_mounted_and_ignored(files: tuple[Path, ...]) -> None:
    merged = compose(*files)
    service = merged["services"][SERVICE]
    attached = _secrets_attached(service)
    declared = merged.get("secrets") or {}
    assert attached <= set(declared), f"secrets mounted but not declared: {sorted(attached - set(declared))}"
    for key, value in environment(service).items():
        if value.startswith("/run/secrets/"):
            name = value.removeprefix("/run/secrets/")
            assert name in attached, f"{key} points at secret {name}, which the service does not mount"
    git = shutil.which("git")
    for name, secret in declared.items():
        path = (DOCKER / with_defaults(secret["file"])).resolve()
        relative = path.relative_to(ROOT).as_posix()
        # Secrets are the operator's files: never committed, never sent to the build.
        assert any(
            relative == p.rstrip("/") or relative.startswith(p.rstrip("/") + "/") for p in dockerignore_patterns()
        ), f"secret {name} ({relative}) is not in .dockerignore"
        if git is not None and (ROOT / ".git").exists():
            ignored = subprocess.run([git, "check-ignore", "-q", relative], cwd=ROOT, check=False, timeout=30)
            assert ignored.returncode == 0, f"secret {name} ({relative}) is not git-ignored"


def test_tokens_override_mounts_the_token_file() -> None:
    tokens = load_compose(COMPOSE_TOKENS)
    service = tokens["services"][SERVICE]
    assert environment(service) == {"LOSSD_TOKEN_FILE": f"/run/secrets/{TOKEN_SECRET}"}
    assert _secrets_attached(service) == {TOKEN_SECRET}
    assert with_defaults(tokens["secrets"][TOKEN_SECRET]["file"]) == "./tokens"  # docker/tokens, as the README says
    # The override adds tokens and nothing else: ports, devices and volume stay compose.yaml's.
    assert set(service) == {"environment", "secrets"}
    for files in COMBINATIONS:
        merged = compose(*files)["services"][SERVICE]
        with_tokens = COMPOSE_TOKENS in files
        assert ("LOSSD_TOKEN_FILE" in environment(merged)) == with_tokens, [path.name for path in files]
        assert (TOKEN_SECRET in _secrets_attached(merged)) == with_tokens, [path.name for path in files]


def _is_bind_source(source: str) -> bool:
    return source.startswith((".", "/", "~", "$")) or "/" in source


def referenced_host_files(path: Path) -> list[Path]:
    """Every host path one compose file makes compose read or mount, ``${VAR:-default}`` at its default:
    secret and config files, env_file, bind-mount sources, the build context and Dockerfile."""
    document = load_compose(path)
    base = path.parent
    found: list[str] = []
    for section in ("secrets", "configs"):
        for entry in (document.get(section) or {}).values():
            if isinstance(entry, dict) and "file" in entry:
                found.append(str(entry["file"]))
    for service in (document.get("services") or {}).values():
        env_files = service.get("env_file") or []
        for env_file in [env_files] if isinstance(env_files, str) else env_files:
            found.append(env_file if isinstance(env_file, str) else env_file["path"])
        for volume in service.get("volumes") or []:
            if isinstance(volume, str):
                source = volume.split(":")[0]
                if ":" in volume and _is_bind_source(source):
                    found.append(source)
            elif volume.get("type") == "bind":
                found.append(volume["source"])
        build = service.get("build")
        if isinstance(build, str):
            build = {"context": build}
        if isinstance(build, dict):
            context = with_defaults(str(build.get("context", ".")))
            found.append(context)
            found.append(str(Path(context) / with_defaults(str(build.get("dockerfile", "Dockerfile")))))
    return [(base / with_defaults(item)).resolve() for item in found]


def _in_a_fresh_checkout(path: Path) -> bool:
    """Whether ``path`` is part of the repository rather than a file the operator creates."""
    if not path.exists():
        return False
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists() or not path.resolve().is_relative_to(ROOT):
        return True
    relative = path.resolve().relative_to(ROOT).as_posix()
    ignored = subprocess.run([git, "check-ignore", "-q", relative], cwd=ROOT, check=False, timeout=30)
    return ignored.returncode != 0  # an ignored path (docker/tokens, docker/tls/) is the operator's


def test_compose_yaml_alone_needs_no_file_the_operator_creates() -> None:
    # `docker compose -f docker/compose.yaml up -d` must work in a fresh checkout.
    document = load_compose(COMPOSE)
    service = document["services"][SERVICE]
    assert not document.get("secrets") and not service.get("secrets"), "secrets belong in an override file"
    assert not document.get("configs") and not service.get("configs")
    assert not service.get("env_file"), "an env_file must exist; compose reads docker/.env by itself when present"
    for key in FILE_SETTINGS:
        assert key not in environment(service), f"{key} names a file compose.yaml alone does not provide"
    references = referenced_host_files(COMPOSE)
    assert DOCKERFILE in references  # the scan sees what compose.yaml does reference
    for path in references:
        assert _in_a_fresh_checkout(path), f"compose.yaml needs {path}, which a fresh checkout does not have"


def test_referenced_host_files_finds_secrets_and_bind_mounts(tmp_path: Path) -> None:
    # The scan above must see the kinds of reference that would break a fresh checkout.
    broken = tmp_path / "compose.yaml"
    broken.write_text(
        "services:\n"
        "  lossd:\n"
        "    image: lossd\n"
        "    env_file: [./extra.env]\n"
        "    volumes: [lossd-state:/var/lib/lossd, ./certs:/certs:ro, {type: bind, source: /srv/x, target: /x}]\n"
        "    secrets: [lossd_tokens]\n"
        "secrets:\n"
        "  lossd_tokens:\n"
        "    file: ${TOKENS_FILE:-./tokens}\n",
        encoding="utf-8",
    )
    found = set(referenced_host_files(broken))
    expected = {tmp_path / "extra.env", tmp_path / "certs", Path("/srv/x").resolve(), tmp_path / "tokens"}
    assert found == {path.resolve() for path in expected}
    assert not _in_a_fresh_checkout(tmp_path / "tokens")  # missing
    assert not _in_a_fresh_checkout(DOCKER / "tokens")  # missing, or the operator's git-ignored file
    assert _in_a_fresh_checkout(DOCKERFILE)


def test_bind_mounted_files_exist() -> None:
    for path in COMPOSE_FILES:
        service = load_compose(path)["services"][SERVICE]
        for volume in service.get("volumes") or []:
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith((".", "/")) and "${" not in source:
                assert (path.parent / source).exists(), f"{path.name}: bind mount {source} does not exist"


def test_cpu_variant_reserves_no_gpu(dockerfile: list[Instruction]) -> None:
    cpu = compose(COMPOSE, COMPOSE_CPU)["services"][SERVICE]
    assert devices(cpu) == []
    assert environment(cpu)["LOSSD_DEVICE"] == "cpu"
    gpu = compose(COMPOSE)["services"][SERVICE]
    # Same volume, ports and secrets: the variants are interchangeable on one host.
    assert cpu["volumes"] == gpu["volumes"] and cpu["ports"] == gpu["ports"]
    assert cpu.get("secrets") == gpu.get("secrets")


def _docker_compose() -> list[str] | None:
    docker = shutil.which("docker")
    if docker is not None:
        plugin = subprocess.run([docker, "compose", "version"], capture_output=True, check=False, timeout=30)
        if plugin.returncode == 0:
            return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    if standalone is not None:
        probe = subprocess.run([standalone, "version"], capture_output=True, text=True, check=False, timeout=30)
        if probe.returncode == 0 and "v2." in probe.stdout:
            return [standalone]
    return None


@pytest.mark.parametrize("gpu_count", ["1", "all"])
def test_docker_compose_renders_the_files(gpu_count: str) -> None:
    command = _docker_compose()
    if command is None:
        pytest.skip("no Docker Compose v2 on PATH")
    env = {key: value for key, value in os.environ.items() if not key.startswith("LOSSD_")}
    env["GPU_COUNT"] = gpu_count

    def render(*files: Path) -> dict[str, Any]:
        args = [arg for path in files for arg in ("-f", str(path))]
        done = subprocess.run(
            [*command, *args, "config", "--format", "json"],
            capture_output=True,
            text=True,
            env=env,
            check=False,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        rendered: dict[str, Any] = json.loads(done.stdout)["services"][SERVICE]
        return rendered

    def secrets(service: dict[str, Any]) -> set[str]:
        return {secret["source"] for secret in service.get("secrets") or []}

    default = render(COMPOSE)
    (device,) = devices(default)
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert device["count"] == (-1 if gpu_count == "all" else 1)  # compose writes "all" as -1
    assert secrets(default) == set() and "LOSSD_TOKEN_FILE" not in default["environment"]
    cpu = render(COMPOSE, COMPOSE_CPU)
    assert devices(cpu) == [] and cpu["environment"]["LOSSD_DEVICE"] == "cpu"
    tokens = render(COMPOSE, COMPOSE_TOKENS)
    assert secrets(tokens) == {TOKEN_SECRET}
    assert tokens["environment"]["LOSSD_TOKEN_FILE"] == f"/run/secrets/{TOKEN_SECRET}"
    assert len(devices(tokens)) == 1
    everything = render(COMPOSE, COMPOSE_CPU, COMPOSE_TOKENS, COMPOSE_TLS)
    assert secrets(everything) == {TOKEN_SECRET, "lossd_tls_cert", "lossd_tls_key"}
    assert devices(everything) == [] and everything["environment"]["LOSSD_DEVICE"] == "cpu"


# --- the README's settings table ----------------------------------------------------------


def _settings_table_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("settings_table", ROOT / "scripts" / "settings_table.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_settings_table_lists_every_field() -> None:
    table: str = _settings_table_script().settings_table()
    rows = [line for line in table.splitlines() if line.startswith("| `--")]
    assert len(rows) == len(Settings.model_fields)
    for row, name in zip(rows, Settings.model_fields, strict=True):
        assert row.startswith(f"| `--{name.replace('_', '-')}` | `LOSSD_{name.upper()}` |"), row


def test_readme_settings_table_is_current() -> None:
    script = _settings_table_script()
    in_readme = script.readme_table((ROOT / "README.md").read_text(encoding="utf-8"))
    assert in_readme == script.settings_table(), (
        "README.md's settings table differs from Settings: run `python scripts/settings_table.py --write`"
    )
