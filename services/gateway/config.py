"""Gateway settings: where jobs are stored, where the model services are, how much work to accept."""

from __future__ import annotations

from dramaturg.shared.config import ServiceSettings
from pydantic import Field


class GatewaySettings(ServiceSettings):
    # sqlite:///PATH or postgresql://USER@HOST:PORT/DB (password: PGPASSWORD);
    # empty = $DRAMATURG_HOME/gateway/jobs.db
    job_store: str = ""
    # Bearer token; empty = DRAMATURG_API_TOKEN or $DRAMATURG_HOME/api-token. Required to start.
    api_token: str = ""
    # service name → host:port of its gRPC endpoint
    services: dict[str, str] = Field(default_factory=dict)
    max_running_jobs: int = 4
    max_pending_jobs: int = 64
    retry_base_seconds: float = 0.5
