"""Gateway settings: where jobs are stored, where the model services are, how much work to accept."""

from __future__ import annotations

from typing import Literal

from dramaturg.shared.config import MiB, ServiceSettings
from pydantic import Field

# The gateway's channels to the model services are opened with this send limit (shared/grpc/client.py),
# and the services receive at most server.max_message_bytes (64 MiB by default): an inline request
# cannot be larger.
CHANNEL_MESSAGE_LIMIT_BYTES = 64 * MiB


class GatewaySettings(ServiceSettings):
    # sqlite:///PATH or postgresql://USER@HOST:PORT/DB (password: PGPASSWORD);
    # empty = $DRAMATURG_HOME/gateway/jobs.db
    job_store: str = ""
    # This gateway's name in the job store's leases; empty = HOSTNAME:PORT (a pod's name in
    # Kubernetes), or HOSTNAME-<random> when the port is picked at start. Replicas sharing a
    # PostgreSQL store need distinct ids; a restarted replica with the same id resumes its jobs at once.
    replica_id: str = ""
    # How long a job stays with a gateway that stopped renewing its lease (killed, partitioned) before
    # another replica takes it over; leases are renewed every third of it.
    lease_seconds: float = Field(15.0, ge=0.3)
    # Bearer token; empty = DRAMATURG_API_TOKEN or $DRAMATURG_HOME/api-token. Required to start.
    api_token: str = ""
    # service name → host:port of its gRPC endpoint
    services: dict[str, str] = Field(default_factory=dict)
    max_running_jobs: int = 4
    max_pending_jobs: int = 64
    retry_base_seconds: float = 0.5
    # How long a stage waits for a model service that answers UNAVAILABLE (killed, restarting, being
    # rolled) before the job fails; those retries do not count against the stage's attempts.
    service_down_patience_seconds: float = Field(300.0, ge=0)
    # How a job's audio reaches the model services. The gateway decodes it once at submit into a
    # content-addressed blob (16 kHz mono WAV, under blob_root). "uri": requests name the blob
    # (AudioInput.uri) and the services read it, which needs a file system they share with the
    # gateway at the same path and blob_root among their audio_uri_roots (the default when both use
    # the same DRAMATURG_HOME). "inline": the audio travels in the request, the whole scene for
    # diarization and only the lines' audio for per-segment stages; use it where the services cannot
    # see the gateway's files (Kubernetes without a shared volume).
    audio_transport: Literal["uri", "inline"] = "uri"
    # Where the blobs live; empty = $DRAMATURG_HOME/blobs.
    blob_root: str = ""
    # The largest request the gateway sends inline: the services' server.max_message_bytes. Audio
    # that would need a larger request is refused at submit (INVALID_ARGUMENT naming this limit), and
    # per-segment stages split their lines across several requests below it.
    inline_message_limit_bytes: int = Field(CHANNEL_MESSAGE_LIMIT_BYTES, ge=256 * 1024,
                                            le=CHANNEL_MESSAGE_LIMIT_BYTES)
    # The longest audio a job may have (a job's max_seconds parameter may only lower it).
    max_audio_seconds: float = Field(3 * 3600.0, gt=0)
    # Folders under which a SubmitJob's audio.uri may point (clients on the gateway's machine or
    # volume submitting long recordings by path); empty: clients send the audio inline.
    audio_uri_roots: list[str] = Field(default_factory=list)
    # web console
    # The browser front end (services/gateway/console.py), served by the gateway process itself behind
    # the API token. None: no console; 0: any free port (logged, and GatewayService.console_url).
    console_port: int | None = Field(None, ge=0, le=65535)
    # Where it listens; empty = server.host (loopback unless the gRPC server is exposed too).
    console_host: str = ""
    # How long a sign-in lasts; the session cookie is an HMAC of the token, so a new token ends them all.
    console_session_hours: float = Field(12.0, gt=0)
