"""Configuration: where state lives, and how a service's settings are read.

Every setting has a default that makes the embedded stack (one machine, CPU, loopback) work; a YAML
file overrides the defaults and ``DRAMATURG_<SECTION>__<KEY>`` environment variables override the file,
so containers are configured without editing files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T", bound=BaseModel)

MiB = 1024 * 1024


def dramaturg_home() -> Path:
    """Root of all state: job store, model store, voices, runs, logs (``DRAMATURG_HOME``)."""
    home = Path(os.environ.get("DRAMATURG_HOME", "~/.dramaturg")).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home


class ServerSettings(BaseModel):
    """What every gRPC server shares (see :mod:`dramaturg.shared.grpc.server`)."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int | None = None
    # Speech requests are large: 4 MiB (gRPC's default) is a minute of 16 kHz float audio.
    max_message_bytes: int = 64 * MiB
    max_concurrent_rpcs: int = 256
    # On SIGTERM: say NOT_SERVING for drain_notice_seconds (balancers and probes notice, new calls
    # still answered), then stop accepting calls and give in-flight ones drain_grace_seconds.
    drain_notice_seconds: float = 1.0
    drain_grace_seconds: float = 10.0
    tls_cert_file: str | None = None
    tls_key_file: str | None = None


class ServiceSettings(BaseModel):
    """Base of every service's settings: server section plus service-specific fields."""

    model_config = ConfigDict(extra="forbid")

    server: ServerSettings = Field(default_factory=ServerSettings)


def _env_overrides(prefix: str) -> dict[str, Any]:
    """``<PREFIX>SERVER__PORT=9000`` → ``{"server": {"port": "9000"}}``, ``<PREFIX>DEVICE=cuda`` →
    ``{"device": "cuda"}`` (pydantic coerces types; an unknown key fails validation: typos are caught)."""
    out: dict[str, Any] = {}
    for key, value in os.environ.items():
        if not key.startswith(prefix) or len(key) == len(prefix):
            continue
        path = key[len(prefix) :].lower().split("__")
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_settings(
    cls: type[T],
    path: str | Path | None = None,
    *,
    env_prefix: str,
    overrides: dict[str, Any] | None = None,
) -> T:
    """Defaults ← YAML file ← environment ← explicit overrides (e.g. CLI flags)."""
    data: dict[str, Any] = {}
    if path:
        text = Path(path).read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
    data = _merge(data, _env_overrides(env_prefix))
    data = _merge(data, overrides or {})
    return cls.model_validate(data)
