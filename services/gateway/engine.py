"""The job engine: runs pipelines stage by stage, persists every step, resumes after a crash.

Every change to a job is written to the job store (with an event) before anyone is told about it, so
WatchJob can replay a job's history from any sequence number and a gateway that was killed finds its
unfinished jobs on the next start. Stages that had succeeded keep their persisted output; the others
run again. Concurrency is bounded twice: at most ``max_running`` jobs run, and at most ``max_pending``
wait, beyond which SubmitJob answers RESOURCE_EXHAUSTED with a retry delay.

SubmitJob decodes the client's audio once, in a worker thread, into a content-addressed blob
(shared/blobs.py) that every stage of the job reads; whatever the gateway cannot take (undecodable
bytes, audio over ``max_audio_seconds``, a scene an inline request could not carry) is the client's
INVALID_ARGUMENT there and then, never a job that fails later. A blob no unfinished job uses is
deleted when its last job finishes.

Several gateways may share one PostgreSQL job store (replicas). Each job is run by the gateway
that holds its lease (services/gateway/store.py): the submitting gateway holds it from the start and
renews it every third of ``lease_seconds``; a gateway with free slots claims jobs whose lease ran out,
so a gateway killed mid-job has its jobs finished by another, resuming from the last stage result
either persisted. Every write is fenced by the lease, so a gateway that was presumed dead stops
(:class:`LeaseLost`) instead of racing the new owner. Replicas need the job folders and the blob
store on a volume they share.

Remote stages are retried only where another attempt can succeed (:func:`retry_after`): UNAVAILABLE,
deadlines, and RESOURCE_EXHAUSTED from a busy server, but never a request over a gRPC message limit
(also reported as RESOURCE_EXHAUSTED), which would be refused again byte for byte.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from dramaturg.common.v1 import common_pb2
from dramaturg.gateway.v1 import gateway_pb2
from dramaturg.services.gateway.pipelines import (
    GATEWAY,
    SAMPLE_RATE,
    AudioTransport,
    JobAudio,
    PipelineSpec,
    StageContext,
    StageSpec,
)
from dramaturg.services.gateway.reports import describe as describe_files
from dramaturg.services.gateway.store import TERMINAL_STATES, Claimed, JobStore, LeaseLost, StoredEvent
from dramaturg.shared import audio as audio_io
from dramaturg.shared.blobs import BlobStore, default_blob_root
from dramaturg.shared.grpc import errors
from dramaturg.shared.grpc.client import ChannelPool
from dramaturg.shared.grpc.errors import ServiceError, details_from_error
from dramaturg.shared.store import atomic_write_json
from google.protobuf import json_format, struct_pb2, timestamp_pb2
from prometheus_client import Counter, Gauge, Histogram

log = logging.getLogger(__name__)

JOBS_TOTAL = Counter("dramaturg_jobs_total", "Jobs that reached a final state.", ("pipeline", "state"))
JOBS_RUNNING = Gauge("dramaturg_jobs_running", "Jobs running now.")
JOBS_PENDING = Gauge("dramaturg_jobs_pending", "Jobs accepted and waiting for a slot.")
JOBS_TAKEN_OVER = Counter("dramaturg_jobs_taken_over_total",
                          "Jobs this gateway claimed after another gateway's lease on them ran out.")
LEASES_LOST = Counter("dramaturg_job_leases_lost_total",
                      "Jobs this gateway stopped running because another gateway holds their lease now.")
STAGE_SECONDS = Histogram(
    "dramaturg_job_stage_seconds",
    "Time per stage attempt.",
    ("pipeline", "stage", "state"),
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900),
)
STAGE_RETRIES = Counter("dramaturg_job_stage_retries_total", "Stage attempts retried.", ("pipeline", "stage"))

RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
# gRPC's own refusal of an oversized message, on either side: "Sent message larger than max (N vs. M)"
# or "Received message larger than max (N vs. M)", with status RESOURCE_EXHAUSTED.
_MESSAGE_TOO_LARGE = re.compile(r"message larger than max", re.IGNORECASE)
# ErrorInfo reasons of RESOURCE_EXHAUSTED answers that no retry can change (shared/audio.py).
PERMANENT_REASONS = frozenset({"PAYLOAD_TOO_LARGE"})
INPUT_FILE = "input.json"  # a job's input: which blob, and its rate and length
SCENE_AUDIO_FILE = "scene.wav"  # a hard link to the job's decoded input, kept after the blob goes
LEGACY_INPUT_FILE = "input.pb"  # what gateways before the blob store kept: the client's AudioInput
S = gateway_pb2  # short alias for the enums
_TOO_LARGE_HINT = (
    " (not retried: the request was over a message size limit; run the gateway with audio_transport: uri "
    "where the services can read its blob store, or raise the services' server.max_message_bytes)"
)


def message_too_large(code: grpc.StatusCode, message: str, reason: str = "") -> bool:
    """Whether a RESOURCE_EXHAUSTED says the request itself was too big (permanent), not the server busy."""
    return code == grpc.StatusCode.RESOURCE_EXHAUSTED and (
        reason in PERMANENT_REASONS or bool(_MESSAGE_TOO_LARGE.search(message or ""))
    )


def retry_after(
    code: grpc.StatusCode,
    message: str,
    *,
    reason: str = "",
    server_delay: float | None = None,
    backoff: float,
) -> float | None:
    """Seconds to wait before another attempt, or None when another attempt cannot succeed.

    UNAVAILABLE and DEADLINE_EXCEEDED are transient. RESOURCE_EXHAUSTED is transient when a server
    ran out of capacity (a full queue, answered with RetryInfo, or gRPC's concurrent-call limit), but
    permanent when the message was over a size limit: gRPC reports that with the same code, and
    sending the same bytes again is refused again. The server's RetryInfo delay wins over ``backoff``.
    """
    if code not in RETRYABLE or message_too_large(code, message, reason):
        return None
    return server_delay if server_delay else backoff


@dataclass(frozen=True)
class JobInput:
    """What :data:`INPUT_FILE` records about a job's decoded audio."""

    digest: str
    suffix: str
    size: int
    sample_rate: int
    num_samples: int

    def to_json(self) -> dict[str, Any]:
        return {"blob": self.digest, "suffix": self.suffix, "size": self.size,
                "sample_rate_hz": self.sample_rate, "samples": self.num_samples}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobInput:
        return cls(str(data["blob"]), str(data.get("suffix", "")), int(data["size"]),
                   int(data["sample_rate_hz"]), int(data["samples"]))


def keep_scene_audio(blobs: BlobStore, stored: JobInput, work: Path) -> None:
    """Hard-link the job's decoded input into its folder (:data:`SCENE_AUDIO_FILE`): the blob goes when
    the last job using it ends, the job's reports (the console's line players) still need the scene.
    A hard link costs no space; where the job folder and the blob store are on different file systems
    there is none, and the lines play only while the blob exists."""
    ref = blobs.get(stored.digest, stored.suffix)
    if ref is None:
        return
    try:
        os.link(ref.path, work / SCENE_AUDIO_FILE)
    except FileExistsError:
        pass
    except OSError as exc:
        log.info("no hard link of the scene audio into %s (%s): its lines play while the blob exists",
                 work, exc.strerror or exc)


def _decode_to_wav(message: common_pb2.AudioInput, limits: audio_io.AudioLimits) -> tuple[bytes, int]:
    """The client's audio as a 16 kHz mono 16-bit WAV (runs in a worker thread: decoding takes CPU)."""
    decoded = audio_io.decode_audio_input(message, target_rate=SAMPLE_RATE, limits=limits, field="audio")
    return audio_io.encode_wav(decoded), decoded.num_frames


FILES_DIR = "files"  # a job's files, under its work folder
MAX_BACKOFF_SECONDS = 10.0  # the longest wait between two attempts of a stage
PROGRESS_INTERVAL_SECONDS = 0.25  # a stage's progress events, at most this often (its last always)
FILE_CHUNK_BYTES = 256 * 1024  # GetJobFile's pieces: well under any message limit


def write_job_files(writer: Any, result: dict[str, Any], folder: Path) -> list[gateway_pb2.JobFile]:
    """Run a pipeline's report writer into ``folder`` atomically (a resumed job rewrites it whole);
    the writer also sees the job's work folder (``folder``'s parent), where its stages left files."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    writer(result, partial, folder.parent)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return describe_files(folder)


def _now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp


def _struct(data: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(data)
    return out


class _StageFailed(Exception):
    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage


class JobEngine:
    """Submits, runs, cancels, lists and watches jobs over a :class:`JobStore`."""

    def __init__(
        self,
        store: JobStore,
        work_root: Path,
        pipelines: dict[str, PipelineSpec],
        channels: ChannelPool,
        *,
        max_running: int = 4,
        max_pending: int = 64,
        retry_base_seconds: float = 0.5,
        service_down_patience_seconds: float = 300.0,
        blobs: BlobStore | None = None,
        transport: AudioTransport | None = None,
        max_audio_seconds: float = 3 * 3600.0,
        audio_uri_roots: Sequence[str] = (),
        owner: str = "",
        lease_seconds: float = 15.0,
    ) -> None:
        self.store = store
        # this gateway's replica id: what the job rows' owner column names
        self.owner = owner or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        self.lease_seconds = lease_seconds
        self.max_running = max_running
        self.work_root = work_root
        self.pipelines = pipelines
        self.channels = channels
        self.max_pending = max_pending
        self.retry_base_seconds = retry_base_seconds
        self.service_down_patience_seconds = service_down_patience_seconds
        self.blobs = blobs or BlobStore(default_blob_root())  # where the services look by default
        self.transport = transport or AudioTransport()
        self.max_audio_seconds = max_audio_seconds
        self.audio_uri_roots = list(audio_uri_roots)
        # digest → how many unfinished jobs of this process read that blob (deleted when none does)
        self._blob_users: dict[str, int] = {}
        self._job_blob: dict[str, JobInput] = {}
        self._slots = asyncio.Semaphore(max_running)
        self._tasks: dict[str, asyncio.Task] = {}
        self._cancelling: set[str] = set()
        self._changed: dict[str, asyncio.Event] = {}
        self._pending = 0
        self._closing = False
        self._lost: set[str] = set()  # jobs whose lease another gateway took: stop without a mark
        self._lease_task: asyncio.Task | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Resume the unfinished jobs this gateway may take, then keep leases and take over orphans.

        On a store only one gateway uses (SQLite) that is every unfinished job; on a shared store it
        is the jobs this replica held in a previous life, those nobody holds, and those whose lease
        ran out — the rest belong to live gateways.
        """
        await asyncio.to_thread(self.blobs.sweep)
        claimed = await asyncio.to_thread(
            self.store.claim, self.owner, self.lease_seconds, self.max_running + self.max_pending,
            own=True, force=not self.store.shared,
        )
        for found in claimed:
            self._adopt(found, "resumed after a gateway restart")
        self._lease_task = asyncio.create_task(self._keep_leases(), name="job-leases")

    async def stop(self) -> None:
        """Stop running jobs *without* marking them, and give their leases up: the next gateway to
        start (or a replica that is up) resumes them."""
        self._closing = True
        if self._lease_task is not None:
            self._lease_task.cancel()
            await asyncio.gather(self._lease_task, return_exceptions=True)
        tasks = dict(self._tasks)
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        try:
            await asyncio.to_thread(self.store.release, self.owner, tasks)
        except Exception as exc:  # the leases then run out on their own
            log.warning("could not give up the leases of %d job(s): %s", len(tasks), exc)

    def _adopt(self, found: Claimed, reason: str) -> None:
        """Run a job this gateway just claimed, from its last persisted stage results."""
        job = found.job
        if job.job_id in self._tasks:  # our own lease lapsed and we took it back: still running
            return
        stored = self._read_input(self.work_root / job.job_id)
        if stored is not None:  # claimed before any job can finish and delete a shared blob
            self._claim(job.job_id, stored)
        if job.pipeline not in self.pipelines:
            self._finish(job, S.FAILED, f"pipeline {job.pipeline!r} does not exist on this gateway")
            return
        for stage in job.stages:
            if stage.state == S.STAGE_RUNNING:
                stage.state = S.STAGE_PENDING
        job.state = S.PENDING
        if found.previous_owner and found.previous_owner != self.owner:
            JOBS_TAKEN_OVER.inc()
            reason = f"taken over from gateway {found.previous_owner} (its lease ran out)"
        self._save(job, S.JOB_STATE_CHANGED, message=reason)
        log.info("job %s (%s): %s", job.job_id, job.pipeline, reason)
        self._launch(job.job_id)

    async def _keep_leases(self) -> None:
        """Every third of a lease: renew ours, stop what another gateway took, take over orphans."""
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            try:
                await self._lease_round()
            except Exception as exc:  # the store is unreachable: try again next round
                log.warning("lease round failed: %s", exc)

    async def _lease_round(self) -> None:
        ours = [job_id for job_id, task in self._tasks.items() if not task.done()]
        kept = await asyncio.to_thread(self.store.renew, self.owner, ours, self.lease_seconds)
        for job_id in ours:
            task = self._tasks.get(job_id)
            if task is None or task.done():
                continue
            if job_id not in kept:
                if job_id in self._lost:
                    continue
                job = self.store.get(job_id)
                if job is not None and job.state in TERMINAL_STATES:
                    continue  # it finished between the two looks
                log.warning("job %s: another gateway holds its lease now; stopping here", job_id)
                LEASES_LOST.inc()
                self._lost.add(job_id)
                task.cancel()
            elif kept[job_id] and job_id not in self._cancelling:
                log.info("job %s: cancelled through another gateway", job_id)
                self._cancelling.add(job_id)
                task.cancel()
        free = self.max_running - len(self._tasks)
        if free > 0 and not self._closing:
            claimed = await asyncio.to_thread(self.store.claim, self.owner, self.lease_seconds, free)
            for found in claimed:
                self._adopt(found, "claimed")

    # -- RPC-facing ----------------------------------------------------------------------------
    async def submit(self, request: gateway_pb2.SubmitJobRequest) -> gateway_pb2.Job:
        spec = self.pipelines.get(request.pipeline)
        if spec is None:
            known = ", ".join(sorted(self.pipelines))
            raise errors.invalid_argument(
                "pipeline", f"unknown pipeline {request.pipeline!r}; known: {known}"
            )
        params = json_format.MessageToDict(request.params) if request.HasField("params") else {}
        spec.validate_params(params)
        if spec.needs_shared_storage and self.transport.mode != "uri":
            raise errors.failed_precondition(
                f"pipeline {spec.name} hands model services files the gateway writes, so it needs a file "
                "system they share: run the gateway with audio_transport: uri (the local stack and compose "
                "do; deploy/README.md, 'Job audio')",
                reason="NEEDS_SHARED_STORAGE",
            )
        max_seconds = self._max_seconds(params)
        if not request.HasField("audio") or not request.audio.WhichOneof("source"):
            raise errors.invalid_argument("audio", "set audio.content (bytes) or audio.uri")
        if request.request_id:
            existing = self.store.by_request_id(request.request_id)
            if existing is not None:
                return existing
        if self._pending >= self.max_pending:
            raise errors.resource_exhausted(
                f"{self._pending} jobs are already waiting (limit {self.max_pending}); retry later",
                retry_after_seconds=5.0,
            )
        # Decode the audio now, once and off the event loop: a bad file is the client's
        # INVALID_ARGUMENT, not a failed job, and no stage decodes the client's bytes again.
        limits = audio_io.AudioLimits(max_seconds=max_seconds, allowed_uri_roots=self.audio_uri_roots)
        wav, num_samples = await asyncio.to_thread(_decode_to_wav, request.audio, limits)
        spec.check_inline(num_samples / SAMPLE_RATE, num_samples, params, self.transport)
        job_id = uuid.uuid4().hex[:12]
        work = self.work_root / job_id
        try:
            stored = await self._store_input(job_id, wav, num_samples)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        del wav
        job = gateway_pb2.Job(
            job_id=job_id,
            pipeline=spec.name,
            state=S.PENDING,
            request_id=request.request_id,
            params=_struct(params),
            labels=dict(request.labels),
            created_at=_now(),
            updated_at=_now(),
            stages=[
                gateway_pb2.Stage(
                    name=s.name, service=s.service, state=S.STAGE_PENDING, depends_on=list(s.depends_on)
                )
                for s in spec.stages
            ],
        )
        try:
            saved, created = self.store.create(job, self.owner, self.lease_seconds)
        except BaseException:
            self._release(job_id)
            shutil.rmtree(work, ignore_errors=True)
            raise
        if not created:  # a concurrent submit with the same request_id won
            self._release(job_id)
            shutil.rmtree(work, ignore_errors=True)
            return saved
        log.info("job %s (%s): %.1f s of audio in blob %s", job_id, spec.name,
                 num_samples / SAMPLE_RATE, stored.digest[:16])
        self._event(job_id, S.JOB_STATE_CHANGED, message="submitted")
        self._launch(job_id)
        return saved

    def _max_seconds(self, params: dict[str, Any]) -> float:
        """The job's audio-length limit: its max_seconds parameter, at most the gateway's."""
        asked = params.get("max_seconds")
        if asked is None:
            return self.max_audio_seconds
        if not 0 < float(asked) <= self.max_audio_seconds:
            raise errors.invalid_argument(
                "params.max_seconds",
                f"must be above 0 and at most {self.max_audio_seconds:g} s, the longest audio this gateway "
                "takes (max_audio_seconds)",
            )
        return float(asked)

    # -- job inputs in the blob store ----------------------------------------------------------
    async def _store_input(self, job_id: str, wav: bytes, num_samples: int) -> JobInput:
        """Write the decoded audio to the blob store and the job's reference to it (in a worker thread).

        The blob is claimed for the job *before* it is written, so a finishing job that used the same
        content cannot delete it between the write and the claim.
        """
        digest = BlobStore.digest_of(wav)
        stored = JobInput(digest, ".wav", len(wav), SAMPLE_RATE, num_samples)
        self._claim(job_id, stored)
        work = self.work_root / job_id

        def write() -> None:
            self.blobs.put(wav, stored.suffix)
            work.mkdir(parents=True, exist_ok=True)
            keep_scene_audio(self.blobs, stored, work)
            atomic_write_json(work / INPUT_FILE, stored.to_json())

        try:
            await asyncio.to_thread(write)
        except BaseException:
            self._release(job_id)
            raise
        return stored

    def _claim(self, job_id: str, stored: JobInput) -> None:
        if job_id in self._job_blob:
            return
        self._job_blob[job_id] = stored
        self._blob_users[stored.digest] = self._blob_users.get(stored.digest, 0) + 1

    def _forget_input(self, job_id: str) -> JobInput | None:
        """Drop this process's use of the job's blob; its input when no job of this process uses it now."""
        stored = self._job_blob.pop(job_id, None)
        if stored is None:
            return None
        users = self._blob_users.get(stored.digest, 0) - 1
        if users > 0:
            self._blob_users[stored.digest] = users
            return None
        self._blob_users.pop(stored.digest, None)
        return stored

    def _used_elsewhere(self, job_id: str, digest: str) -> bool:
        """Whether an unfinished job of another gateway sharing the store reads this blob."""
        if not self.store.shared:
            return False
        for other in self.store.unfinished():
            if other.job_id != job_id:
                found = self._read_input(self.work_root / other.job_id)
                if found is not None and found.digest == digest:
                    return True
        return False

    def _release(self, job_id: str) -> None:
        """The job no longer needs its blob: delete it unless another unfinished job uses it too."""
        stored = self._forget_input(job_id)
        if stored is None or self._used_elsewhere(job_id, stored.digest):
            return
        try:
            self.blobs.delete(stored.digest, stored.suffix)
        except OSError as exc:  # the job's outcome stands; a leftover blob is only disk space
            log.warning("job %s: could not delete its audio blob: %s", job_id, exc)

    @staticmethod
    def _read_input(work: Path) -> JobInput | None:
        try:
            return JobInput.from_json(json.loads((work / INPUT_FILE).read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("unreadable job input %s: %s", work / INPUT_FILE, exc)
            return None

    async def _job_audio(self, job_id: str, work: Path) -> JobAudio:
        """The running job's audio; a job an older gateway stored (its AudioInput) is decoded into a
        blob first, once."""
        stored = self._job_blob.get(job_id) or await asyncio.to_thread(self._read_input, work)
        if stored is None:
            legacy = work / LEGACY_INPUT_FILE
            if not await asyncio.to_thread(legacy.is_file):
                raise _StageFailed("", f"{work / INPUT_FILE} is missing")
            message = common_pb2.AudioInput.FromString(await asyncio.to_thread(legacy.read_bytes))
            limits = audio_io.AudioLimits(max_seconds=self.max_audio_seconds)
            try:
                wav, num_samples = await asyncio.to_thread(_decode_to_wav, message, limits)
            except ServiceError as exc:
                raise _StageFailed("", f"it does not decode: {exc.message}") from exc
            stored = await self._store_input(job_id, wav, num_samples)
            await asyncio.to_thread(legacy.unlink, missing_ok=True)
            log.info("job %s: moved its input from %s into the blob store", job_id, LEGACY_INPUT_FILE)
        self._claim(job_id, stored)
        ref = await asyncio.to_thread(self.blobs.get, stored.digest, stored.suffix)
        if ref is None:
            raise _StageFailed("", f"its blob {stored.digest} is gone from {self.blobs.root}; "
                                   "submit the job again")
        return JobAudio(ref, stored.sample_rate, stored.num_samples)

    async def read_file(
        self, job_id: str, name: str, offset: int = 0
    ) -> AsyncIterator[gateway_pb2.JobFileChunk]:
        """A job's file (one of ``Job.files``) in chunks from ``offset``; only listed names are read.

        At least one chunk is sent (an empty file, or an offset at its end, sends one with no data).
        """
        job = self.get(job_id)
        entry = next((f for f in job.files if f.name == name), None)
        if entry is None:
            listed = ", ".join(f.name for f in job.files) or "none (it has not finished, or wrote none)"
            raise errors.not_found("file", f"{job_id}/{name}", f"the job's files: {listed}")
        if not 0 <= offset <= entry.size_bytes:
            raise errors.invalid_argument("offset", f"{offset} is outside the file's {entry.size_bytes} "
                                                    "bytes")
        handle = await asyncio.to_thread(open, self.work_root / job_id / FILES_DIR / entry.name, "rb")
        try:
            await asyncio.to_thread(handle.seek, offset)
            position, first = offset, True
            while True:
                data = await asyncio.to_thread(handle.read, FILE_CHUNK_BYTES)
                if data or first:
                    yield gateway_pb2.JobFileChunk(data=data, offset=position, size_bytes=entry.size_bytes,
                                                   content_type=entry.content_type)
                position, first = position + len(data), False
                if len(data) < FILE_CHUNK_BYTES:
                    return
        finally:
            handle.close()

    def get(self, job_id: str) -> gateway_pb2.Job:
        job = self.store.get(job_id) if job_id else None
        if job is None:
            raise errors.not_found("job", job_id, "list jobs with `dramaturg job list`")
        return job

    async def cancel(self, job_id: str) -> gateway_pb2.Job:
        job = self.get(job_id)
        if job.state in TERMINAL_STATES:
            raise errors.failed_precondition(
                f"job {job_id} already finished ({S.JobState.Name(job.state)}); "
                "only pending or running jobs can be cancelled",
                reason="JOB_FINISHED",
            )
        task = self._tasks.get(job_id)
        if task is not None:
            self._cancelling.add(job_id)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return self.get(job_id)
        # not running here: take it if nobody runs it, else flag it for the gateway that does
        claimed = await asyncio.to_thread(self.store.claim, self.owner, self.lease_seconds, 1,
                                          job_id=job_id, own=True)
        if claimed:
            self._finish(claimed[0].job, S.CANCELLED, "cancelled by the client")
            return self.get(job_id)
        await asyncio.to_thread(self.store.request_cancel, job_id)
        holder, _ = await asyncio.to_thread(self.store.lease, job_id)
        log.info("job %s runs on gateway %s: cancellation requested there", job_id, holder)
        deadline = time.monotonic() + self.lease_seconds
        while time.monotonic() < deadline:  # the owner sees the flag within a third of a lease
            job = self.get(job_id)
            if job.state in TERMINAL_STATES:
                break
            await asyncio.sleep(0.1)
        return job

    def list(self, request: gateway_pb2.ListJobsRequest) -> gateway_pb2.ListJobsResponse:
        size = request.page_size or 50
        if not 0 < size <= 500:
            raise errors.invalid_argument("page_size", "must be between 1 and 500")
        before = None
        if request.page_token:
            try:
                stamp, _, last_id = request.page_token.partition(":")
                before = (float(stamp), last_id)
            except ValueError:
                raise errors.invalid_argument("page_token", "not a token this gateway issued") from None
        jobs = self.store.list(state=request.state, pipeline=request.pipeline, limit=size + 1, before=before)
        token = ""
        if len(jobs) > size:
            jobs = jobs[:size]
            last = jobs[-1]
            token = f"{last.created_at.ToNanoseconds() / 1e9!r}:{last.job_id}"
        return gateway_pb2.ListJobsResponse(jobs=jobs, next_page_token=token)

    async def watch(self, job_id: str, after_sequence: int = 0) -> AsyncIterator[gateway_pb2.JobEvent]:
        self.get(job_id)
        sequence = after_sequence
        while True:
            changed = self._changed.setdefault(job_id, asyncio.Event())
            events = self.store.events_after(job_id, sequence)
            for event in events:
                sequence = event.sequence
                yield self._event_proto(event)
            job = self.store.get(job_id)
            if (
                job is not None
                and job.state in TERMINAL_STATES
                and not self.store.events_after(job_id, sequence)
            ):
                return
            try:  # another gateway process may write too: poll now and then as well
                await asyncio.wait_for(changed.wait(), timeout=1.0)
            except TimeoutError:
                pass

    def _event_proto(self, event: StoredEvent) -> gateway_pb2.JobEvent:
        stamp = timestamp_pb2.Timestamp()
        stamp.FromNanoseconds(int(event.time * 1e9))
        return gateway_pb2.JobEvent(
            job_id=event.job_id,
            sequence=event.sequence,
            time=stamp,
            kind=event.kind,
            stage=event.stage,
            message=event.message,
            job=self.store.get(event.job_id),
        )

    # -- running -------------------------------------------------------------------------------
    def _event(self, job_id: str, kind: int, stage: str = "", message: str = "") -> None:
        self.store.add_event(job_id, kind, stage, message, owner=self.owner)
        self._notify(job_id)

    def _notify(self, job_id: str) -> None:
        changed = self._changed.pop(job_id, None)
        if changed is not None:
            changed.set()

    def _save(self, job: gateway_pb2.Job, kind: int, stage: str = "", message: str = "") -> None:
        job.updated_at.CopyFrom(_now())
        done = [s for s in job.stages if s.state in (S.STAGE_SUCCEEDED, S.STAGE_SKIPPED)]
        running = [s.progress for s in job.stages if s.state == S.STAGE_RUNNING]
        job.progress = (len(done) + sum(running)) / max(len(job.stages), 1)
        self.store.save_with_event(job, kind, stage, message, owner=self.owner)
        self._notify(job.job_id)

    def _finish(self, job: gateway_pb2.Job, state: int, message: str, result: dict | None = None) -> None:
        job.state = state
        job.finished_at.CopyFrom(_now())
        if state == S.FAILED:
            job.error = message
        if result is not None:
            job.result.CopyFrom(_struct(result))
        for stage in job.stages:
            if stage.state in (S.STAGE_PENDING, S.STAGE_RUNNING):
                stage.state = S.STAGE_CANCELLED if state == S.CANCELLED else S.STAGE_SKIPPED
        self._save(job, S.JOB_STATE_CHANGED, message=message)
        JOBS_TOTAL.labels(job.pipeline, S.JobState.Name(state)).inc()
        self._release(job.job_id)

    def _launch(self, job_id: str) -> None:
        self._pending += 1
        JOBS_PENDING.set(self._pending)
        task = asyncio.create_task(self._run_job(job_id), name=f"job-{job_id}")
        self._tasks[job_id] = task
        task.add_done_callback(lambda _t: self._tasks.pop(job_id, None))

    async def _run_job(self, job_id: str) -> None:
        waiting = True
        try:
            async with self._slots:
                waiting = False
                self._pending -= 1
                JOBS_PENDING.set(self._pending)
                JOBS_RUNNING.inc()
                try:
                    await self._execute(job_id)
                finally:
                    JOBS_RUNNING.dec()
        except LeaseLost as lost:
            log.warning("%s; this gateway stops running it", lost)
            self._lost.add(job_id)
        except asyncio.CancelledError:
            if job_id in self._lost:
                pass
            elif job_id in self._cancelling:
                self._cancelling.discard(job_id)
                job = self.store.get(job_id)
                if job is not None and job.state not in TERMINAL_STATES:
                    try:
                        self._finish(job, S.CANCELLED, "cancelled by the client")
                    except LeaseLost as lost:
                        log.warning("%s; its new owner cancels it", lost)
            elif not self._closing:
                raise
        finally:
            if job_id in self._lost:  # the new owner uses the job's blob now: forget it, keep it
                self._lost.discard(job_id)
                self._forget_input(job_id)
            if waiting:
                self._pending -= 1
                JOBS_PENDING.set(self._pending)

    async def _execute(self, job_id: str) -> None:
        job = self.store.get(job_id)
        if job is None or job.state in TERMINAL_STATES:
            return
        spec = self.pipelines[job.pipeline]
        work = self.work_root / job_id
        params = json_format.MessageToDict(job.params)
        try:
            audio = await self._job_audio(job_id, work)
        except (_StageFailed, OSError) as failure:
            log.warning("job %s: no input audio: %s", job_id, failure)
            self._finish(job, S.FAILED, f"the job's input audio cannot be read: {failure}")
            return
        job.state = S.RUNNING
        self._save(job, S.JOB_STATE_CHANGED, message="running")
        stages = {s.name: s for s in job.stages}
        outputs = {
            s.name: json_format.MessageToDict(s.output) for s in job.stages if s.state == S.STAGE_SUCCEEDED
        }
        running: dict[str, asyncio.Task] = {}
        try:
            while len(outputs) < len(spec.stages):
                for stage_spec in spec.stages:
                    name = stage_spec.name
                    if name in outputs or name in running:
                        continue
                    if all(dep in outputs for dep in stage_spec.depends_on):
                        inputs = {dep: outputs[dep] for dep in stage_spec.depends_on}
                        running[name] = asyncio.create_task(
                            self._run_stage(job, spec, stage_spec, stages[name], params, work, audio, inputs)
                        )
                if not running:
                    raise _StageFailed("", "no stage can run: the pipeline graph is broken")
                done, _ = await asyncio.wait(running.values(), return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    name = next(n for n, t in running.items() if t is task)
                    del running[name]
                    outputs[name] = task.result()  # raises _StageFailed
        except _StageFailed as failure:
            for task in running.values():
                task.cancel()
            await asyncio.gather(*running.values(), return_exceptions=True)
            self._finish(job, S.FAILED, f"stage {failure.stage} failed: {failure}")
            return
        except BaseException:  # cancelled, or the lease was lost: the stages stop with the job
            for task in running.values():
                task.cancel()
            await asyncio.gather(*running.values(), return_exceptions=True)
            raise
        try:
            result = spec.result(outputs)
        except Exception as exc:  # a bug in the pipeline's result function
            log.exception("job %s: building the result failed", job_id)
            self._finish(job, S.FAILED, f"building the result failed: {exc}")
            return
        if spec.report is not None:
            try:
                files = await asyncio.to_thread(write_job_files, spec.report, result, work / FILES_DIR)
            except Exception as exc:  # a bug in the writer, or a full disk
                log.exception("job %s: writing its files failed", job_id)
                self._finish(job, S.FAILED, f"writing the job's files failed: {exc}")
                return
            del job.files[:]
            job.files.extend(files)
        self._finish(job, S.SUCCEEDED, "succeeded", result)

    def _skip_reason(self, stage_spec: StageSpec) -> str:
        """Why an optional stage cannot run here ("" when it can): its service has no endpoint."""
        service = stage_spec.service
        endpoints = getattr(self.channels, "endpoints", {})
        if not stage_spec.optional or service == GATEWAY or endpoints.get(service):
            return ""
        return (f"the gateway has no endpoint for the {service} service (set services.{service} in its "
                "config; dramaturg up does this for every service with a model)")

    async def _run_stage(
        self,
        job: gateway_pb2.Job,
        spec: PipelineSpec,
        stage_spec: StageSpec,
        stage: gateway_pb2.Stage,
        params: dict,
        work: Path,
        audio: JobAudio,
        inputs: dict[str, dict],
    ) -> dict:
        name = stage_spec.name
        reason = self._skip_reason(stage_spec)
        if reason:
            output = {"skipped": reason}
            stage.state = S.STAGE_SKIPPED
            stage.output.CopyFrom(_struct(output))
            stage.finished_at.CopyFrom(_now())
            self._save(job, S.STAGE_STATE_CHANGED, name, f"skipped: {reason}")
            return output
        first_attempt = stage.attempts + 1
        attempt, counted = first_attempt - 1, 0
        down_since: float | None = None  # when the service first answered UNAVAILABLE, in a row
        while True:
            attempt += 1
            stage.attempts = attempt
            stage.state = S.STAGE_RUNNING
            stage.progress = 0.0
            stage.error = ""
            stage.started_at.CopyFrom(_now())
            self._save(job, S.STAGE_STATE_CHANGED, name, f"attempt {attempt}")

            last_report = [0.0]

            async def report(fraction: float, message: str, _stage: gateway_pb2.Stage = stage,
                             _last: list[float] = last_report) -> None:
                # every progress event writes the whole job to the store: per-line stages would write
                # one per line, so they are kept to one per PROGRESS_INTERVAL_SECONDS (and the last)
                _stage.progress = max(0.0, min(1.0, fraction))
                now = time.monotonic()
                if fraction < 1.0 and now - _last[0] < PROGRESS_INTERVAL_SECONDS:
                    return
                _last[0] = now
                self._save(job, S.STAGE_PROGRESS, name, message)

            ctx = StageContext(
                job_id=job.job_id,
                params=params,
                work_dir=work,
                inputs=inputs,
                audio=audio,
                deadline=time.monotonic() + stage_spec.timeout_seconds,
                channel=self.channels.channel,
                report=report,
                transport=self.transport,
            )
            began = time.perf_counter()
            backoff = min(self.retry_base_seconds * 2 ** (attempt - first_attempt), MAX_BACKOFF_SECONDS)
            delay: float | None = None
            code: grpc.StatusCode | None = None
            try:
                async with asyncio.timeout(stage_spec.timeout_seconds):
                    output = await stage_spec.run(ctx)
            except TimeoutError:
                message = f"deadline of {stage_spec.timeout_seconds:g}s exceeded"
                delay = backoff
            except grpc.aio.AioRpcError as exc:
                detail = details_from_error(exc)
                code = exc.code()
                message = f"{stage_spec.service} answered {exc.code().name}: {detail.message}"
                delay = retry_after(exc.code(), detail.message, reason=detail.reason,
                                    server_delay=detail.retry_after_seconds, backoff=backoff)
                if message_too_large(exc.code(), detail.message, detail.reason):
                    message += _TOO_LARGE_HINT
            except ServiceError as exc:
                message = exc.message
                code = exc.code
                delay = retry_after(exc.code, exc.message, reason=exc.reason,
                                    server_delay=exc.retry_after_seconds, backoff=backoff)
                if message_too_large(exc.code, exc.message, exc.reason):
                    message += _TOO_LARGE_HINT
            except asyncio.CancelledError:
                stage.state = S.STAGE_CANCELLED
                raise
            except LeaseLost:
                raise
            except Exception as exc:
                log.exception("job %s stage %s crashed", job.job_id, name)
                message = f"{type(exc).__name__}: {exc}"
            else:
                stage.state = S.STAGE_SUCCEEDED
                stage.progress = 1.0
                stage.output.CopyFrom(_struct(output))
                stage.finished_at.CopyFrom(_now())
                self._save(job, S.STAGE_STATE_CHANGED, name, "succeeded")
                STAGE_SECONDS.labels(spec.name, name, "succeeded").observe(time.perf_counter() - began)
                return output
            STAGE_SECONDS.labels(spec.name, name, "failed").observe(time.perf_counter() - began)
            stage.error = message
            if code == grpc.StatusCode.UNAVAILABLE and delay is not None:
                # a service that is down (killed, restarting, rolled) is waited for, up to the patience,
                # without spending the attempts kept for errors of the work itself
                down_since = time.monotonic() if down_since is None else down_since
                down = time.monotonic() - down_since
                if down + delay <= self.service_down_patience_seconds:
                    STAGE_RETRIES.labels(spec.name, name).inc()
                    stage.state = S.STAGE_PENDING
                    self._save(job, S.LOG, name, f"{message}; the {stage_spec.service} service has been "
                               f"unavailable for {down:.0f}s, retrying in {delay:.1f}s (patience "
                               f"{self.service_down_patience_seconds:g}s)")
                    await asyncio.sleep(delay)
                    continue
            else:
                down_since = None
            counted += 1
            last = counted >= stage_spec.max_attempts
            if delay is None or last:
                stage.state = S.STAGE_FAILED
                stage.finished_at.CopyFrom(_now())
                self._save(job, S.STAGE_STATE_CHANGED, name, message)
                raise _StageFailed(name, message)
            STAGE_RETRIES.labels(spec.name, name).inc()
            stage.state = S.STAGE_PENDING
            self._save(job, S.LOG, name, f"{message}; retrying in {delay:.1f}s")
            await asyncio.sleep(delay)
