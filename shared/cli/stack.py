"""``dramaturg up`` / ``down``: the embedded default stack — every built service as a local process.

Model services start first; the gateway starts once they are SERVING, with their endpoints in a
generated config. Everything binds to loopback, state lives under ``$DRAMATURG_HOME`` (SQLite job
store, local model store, logs), and ``stack.json`` records what runs where so ``down``, ``job`` and
``demo`` find it.

All processes share one file system, so the gateway hands job audio to the services by reference:
its config says ``audio_transport: uri`` and each model service's config puts the gateway's blob
store (``$DRAMATURG_HOME/blobs``) among its ``audio_uri_roots``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml
from dramaturg.shared.blobs import default_blob_root
from dramaturg.shared.config import dramaturg_home
from dramaturg.shared.grpc.client import wait_for_serving
from dramaturg.shared.registry import get as registry_entry
from dramaturg.shared.registry import model_services


@dataclass
class StackProcess:
    service: str
    pid: int
    port: int
    metrics_port: int
    log: str


@dataclass
class Stack:
    home: str
    token_file: str
    processes: list[StackProcess] = field(default_factory=list)
    console: str = ""  # the gateway's web console URL ("" = none)

    @property
    def gateway(self) -> str:
        return next(f"127.0.0.1:{p.port}" for p in self.processes if p.service == "gateway")

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> Stack:
        data = json.loads(path.read_text())
        return cls(
            home=data["home"],
            token_file=data["token_file"],
            processes=[StackProcess(**p) for p in data["processes"]],
            console=data.get("console", ""),
        )


def stack_file(home: Path) -> Path:
    return home / "stack.json"


def has_model(home: Path, service: str) -> bool:
    """Whether the service has a model to serve (the store's default, or any version that is not a part
    of one, such as a TTS codec or a voice's adapter)."""
    from dramaturg.shared.cli.train import servable
    from dramaturg.shared.store import ModelStore

    store = ModelStore(home)
    return store.default(service) is not None or any(servable(r.labels) for r in store.list(service=service))


def model_service_config(home: Path, service: str) -> Path | None:
    """The stack's settings for a model service: read the gateway's blobs (None: nothing to set)."""
    fields = getattr(registry_entry(service).load_settings_class(), "model_fields", {})
    if "audio_uri_roots" not in fields:
        return None
    config = home / "stack" / f"{service}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump({"audio_uri_roots": [str(default_blob_root(home))]}))
    return config


def gateway_config(home: Path, endpoints: dict[str, str], console_port: int | None = None) -> Path:
    """The stack's gateway settings: the services' endpoints, audio by reference to its blobs, and the
    web console's port (None: no console)."""
    config = home / "stack" / "gateway.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    settings: dict = {"services": endpoints, "audio_transport": "uri",
                      "blob_root": str(default_blob_root(home))}
    if console_port is not None:
        settings["console_port"] = console_port
    config.write_text(yaml.safe_dump(settings))
    return config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _spawn(
    service: str, port: int, metrics_port: int, config: Path | None, logs: Path, env: dict[str, str]
) -> tuple[subprocess.Popen, Path]:
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{service}.log"
    cmd = [
        sys.executable,
        "-m",
        "dramaturg.shared.cli.main",
        "serve",
        service,
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
    ]
    if config is not None:
        cmd += ["--config", str(config)]
    log_file = open(log_path, "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return proc, log_path


def start_stack(
    home: Path, *, gateway_port: int | None = None, timeout: float = 300.0, say=print,
    console_port: int | None = None,
) -> tuple[Stack, list[subprocess.Popen]]:
    """Start every built service and the gateway; return once all report SERVING."""
    from dramaturg.shared.tokens import ensure_token_file

    existing = stack_file(home)
    if existing.exists():
        old = Stack.load(existing)
        if any(_alive(p.pid) for p in old.processes):
            raise RuntimeError(f"a stack is already running (see {existing}); run `dramaturg down` first")
    _token, token_path = ensure_token_file(home)
    env = dict(os.environ, DRAMATURG_HOME=str(home), PYTHONUNBUFFERED="1")
    env.pop("DRAMATURG_API_TOKEN", None)  # the gateway reads the token file the stack just wrote
    stack = Stack(home=str(home), token_file=str(token_path))
    procs: list[subprocess.Popen] = []
    endpoints: dict[str, str] = {}
    logs = home / "logs"
    try:
        for service in model_services():
            if not has_model(home, service):
                say(f"skipping {service}: no model in the store yet (train one: make train-{service})")
                continue
            port, mport = free_port(), free_port()
            proc, log_path = _spawn(service, port, mport, model_service_config(home, service), logs, env)
            procs.append(proc)
            stack.processes.append(StackProcess(service, proc.pid, port, mport, str(log_path)))
            endpoints[service] = f"127.0.0.1:{port}"
        for p in stack.processes:
            say(f"waiting for {p.service} on 127.0.0.1:{p.port} …")
            if not wait_for_serving(f"127.0.0.1:{p.port}", timeout=timeout):
                raise RuntimeError(f"{p.service} did not become SERVING in {timeout:.0f}s; see {p.log}")
        if console_port == 0:
            console_port = free_port()
        config = gateway_config(home, endpoints, console_port)
        if console_port is not None:
            stack.console = f"http://127.0.0.1:{console_port}/"
        port, mport = gateway_port or free_port(), free_port()
        proc, log_path = _spawn("gateway", port, mport, config, logs, env)
        procs.append(proc)
        stack.processes.append(StackProcess("gateway", proc.pid, port, mport, str(log_path)))
        if not wait_for_serving(f"127.0.0.1:{port}", timeout=timeout):
            raise RuntimeError(f"the gateway did not become SERVING in {timeout:.0f}s; see {log_path}")
    except BaseException:
        stop_processes([p.pid for p in stack.processes])
        raise
    stack.save(stack_file(home))
    return stack, procs


def stop_processes(pids: list[int], grace: float = 15.0) -> None:
    """SIGTERM (the services drain), then SIGKILL whatever is left after ``grace`` seconds."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + grace
    for pid in pids:
        while _alive(pid) and time.monotonic() < deadline:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.1)
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def stop_stack(home: Path) -> bool:
    path = stack_file(home)
    if not path.exists():
        return False
    stack = Stack.load(path)
    stop_processes([p.pid for p in reversed(stack.processes)])
    path.unlink()
    return True


def describe(stack: Stack) -> str:
    lines = [f"{'service':<12} {'gRPC':<18} {'metrics':<28} log"]
    for p in stack.processes:
        lines.append(
            f"{p.service:<12} 127.0.0.1:{p.port:<8} http://127.0.0.1:{p.metrics_port}/metrics  {p.log}"
        )
    lines.append(f"API token: {stack.token_file} (export DRAMATURG_API_TOKEN=$(cat {stack.token_file}))")
    if stack.console:
        lines.append(f"web console: {stack.console} (sign in with the API token)")
    return "\n".join(lines)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="start the gateway and every built service locally (embedded default)")
    p.add_argument("--port", type=int, default=50051, help="gateway port (0 = any free port)")
    p.add_argument("--console-port", type=int, default=8080,
                   help="the gateway's web console (0 = any free port, -1 = no console)")
    p.add_argument("--detach", action="store_true", help="return once everything is SERVING")
    p.set_defaults(func=run_up)
    d = sub.add_parser("down", help="stop a stack started with `dramaturg up --detach`")
    d.set_defaults(func=run_down)
    from dramaturg.shared.cli import demo

    demo.register(sub)


def run_up(args: argparse.Namespace) -> int:
    home = dramaturg_home()
    console_port = None if args.console_port < 0 else args.console_port
    stack, procs = start_stack(home, gateway_port=args.port or None, console_port=console_port)
    print(describe(stack))
    if args.detach:
        return 0
    print("stack is up; Ctrl-C stops it")
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        dead = [p for p, proc in zip(stack.processes, procs, strict=True) if proc.poll() is not None]
        print(f"{', '.join(d.service for d in dead)} exited; stopping the stack", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stop_stack(home)


def run_down(args: argparse.Namespace) -> int:
    if stop_stack(dramaturg_home()):
        print("stack stopped")
    else:
        print("no stack is running")
    return 0
