"""The job engine: runs pipelines stage by stage, persists every step, resumes after a crash.

Every change to a job is written to the job store (with an event) before anyone is told about it, so
WatchJob can replay a job's history from any sequence number and a gateway that was killed finds its
unfinished jobs on the next start. Stages that had succeeded keep their persisted output; the others
run again. Concurrency is bounded twice: at most ``max_running`` jobs run, and at most ``max_pending``
wait, beyond which SubmitJob answers RESOURCE_EXHAUSTED with a retry delay.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from dramaturg.common.v1 import common_pb2
from dramaturg.gateway.v1 import gateway_pb2
from dramaturg.services.gateway.pipelines import PipelineSpec, StageContext, StageSpec
from dramaturg.services.gateway.store import TERMINAL_STATES, JobStore, StoredEvent
from dramaturg.shared.grpc import errors
from dramaturg.shared.grpc.client import ChannelPool
from dramaturg.shared.grpc.errors import ServiceError, details_from_error
from google.protobuf import json_format, struct_pb2, timestamp_pb2
from prometheus_client import Counter, Gauge, Histogram

log = logging.getLogger(__name__)

JOBS_TOTAL = Counter("dramaturg_jobs_total", "Jobs that reached a final state.", ("pipeline", "state"))
JOBS_RUNNING = Gauge("dramaturg_jobs_running", "Jobs running now.")
JOBS_PENDING = Gauge("dramaturg_jobs_pending", "Jobs accepted and waiting for a slot.")
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
S = gateway_pb2  # short alias for the enums


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
    ) -> None:
        self.store = store
        self.work_root = work_root
        self.pipelines = pipelines
        self.channels = channels
        self.max_pending = max_pending
        self.retry_base_seconds = retry_base_seconds
        self._slots = asyncio.Semaphore(max_running)
        self._tasks: dict[str, asyncio.Task] = {}
        self._cancelling: set[str] = set()
        self._changed: dict[str, asyncio.Event] = {}
        self._pending = 0
        self._closing = False

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Resume every job a previous gateway left PENDING or RUNNING."""
        for job in self.store.unfinished():
            if job.pipeline not in self.pipelines:
                self._finish(job, S.FAILED, f"pipeline {job.pipeline!r} no longer exists")
                continue
            for stage in job.stages:
                if stage.state == S.STAGE_RUNNING:
                    stage.state = S.STAGE_PENDING
            job.state = S.PENDING
            self._save(job, S.JOB_STATE_CHANGED, message="resumed after a gateway restart")
            log.info("resuming job %s (%s)", job.job_id, job.pipeline)
            self._launch(job.job_id)

    async def stop(self) -> None:
        """Stop running jobs *without* marking them: the next start resumes them."""
        self._closing = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

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
        # Validate the audio now, so a bad file is the client's INVALID_ARGUMENT, not a failed job.
        from dramaturg.shared import audio as audio_io

        await asyncio.to_thread(
            audio_io.decode_audio_input,
            request.audio,
            target_rate=None,
            limits=audio_io.AudioLimits(max_seconds=float(params.get("max_seconds", 3 * 3600))),
            field="audio",
        )
        job_id = uuid.uuid4().hex[:12]
        work = self.work_root / job_id
        work.mkdir(parents=True, exist_ok=True)
        (work / "input.pb").write_bytes(request.audio.SerializeToString())
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
        stored, created = self.store.create(job)
        if not created:
            shutil.rmtree(work, ignore_errors=True)
            return stored
        self._event(job_id, S.JOB_STATE_CHANGED, message="submitted")
        self._launch(job_id)
        return stored

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
        self._cancelling.add(job_id)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        else:  # not running in this process (e.g. never launched): mark it directly
            self._finish(job, S.CANCELLED, "cancelled")
        return self.get(job_id)

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
        self.store.add_event(job_id, kind, stage, message)
        changed = self._changed.pop(job_id, None)
        if changed is not None:
            changed.set()

    def _save(self, job: gateway_pb2.Job, kind: int, stage: str = "", message: str = "") -> None:
        job.updated_at.CopyFrom(_now())
        done = [s for s in job.stages if s.state in (S.STAGE_SUCCEEDED, S.STAGE_SKIPPED)]
        running = [s.progress for s in job.stages if s.state == S.STAGE_RUNNING]
        job.progress = (len(done) + sum(running)) / max(len(job.stages), 1)
        self.store.save(job)
        self._event(job.job_id, kind, stage, message)

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
        except asyncio.CancelledError:
            if job_id in self._cancelling:
                self._cancelling.discard(job_id)
                job = self.store.get(job_id)
                if job is not None and job.state not in TERMINAL_STATES:
                    self._finish(job, S.CANCELLED, "cancelled by the client")
            elif not self._closing:
                raise
        finally:
            if waiting:
                self._pending -= 1
                JOBS_PENDING.set(self._pending)

    async def _execute(self, job_id: str) -> None:
        job = self.store.get(job_id)
        if job is None or job.state in TERMINAL_STATES:
            return
        spec = self.pipelines[job.pipeline]
        work = self.work_root / job_id
        audio = common_pb2.AudioInput.FromString((work / "input.pb").read_bytes())
        params = json_format.MessageToDict(job.params)
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
        except asyncio.CancelledError:
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
        self._finish(job, S.SUCCEEDED, "succeeded", result)

    async def _run_stage(
        self,
        job: gateway_pb2.Job,
        spec: PipelineSpec,
        stage_spec: StageSpec,
        stage: gateway_pb2.Stage,
        params: dict,
        work: Path,
        audio: common_pb2.AudioInput,
        inputs: dict[str, dict],
    ) -> dict:
        name = stage_spec.name
        first_attempt = stage.attempts + 1
        for attempt in range(first_attempt, first_attempt + stage_spec.max_attempts):
            stage.attempts = attempt
            stage.state = S.STAGE_RUNNING
            stage.progress = 0.0
            stage.error = ""
            stage.started_at.CopyFrom(_now())
            self._save(job, S.STAGE_STATE_CHANGED, name, f"attempt {attempt}")

            async def report(fraction: float, message: str, _stage: gateway_pb2.Stage = stage) -> None:
                _stage.progress = max(0.0, min(1.0, fraction))
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
            )
            began = time.perf_counter()
            retry_after: float | None = None
            try:
                async with asyncio.timeout(stage_spec.timeout_seconds):
                    output = await stage_spec.run(ctx)
            except TimeoutError:
                message = f"deadline of {stage_spec.timeout_seconds:g}s exceeded"
                retry_after = self.retry_base_seconds * 2 ** (attempt - first_attempt)
            except grpc.aio.AioRpcError as exc:
                detail = details_from_error(exc)
                message = f"{stage_spec.service} answered {exc.code().name}: {detail.message}"
                if exc.code() in RETRYABLE:
                    retry_after = detail.retry_after_seconds or self.retry_base_seconds * 2 ** (
                        attempt - first_attempt
                    )
            except ServiceError as exc:
                message = exc.message
                if exc.code in RETRYABLE:
                    retry_after = exc.retry_after_seconds or self.retry_base_seconds
            except asyncio.CancelledError:
                stage.state = S.STAGE_CANCELLED
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
            last = attempt == first_attempt + stage_spec.max_attempts - 1
            if retry_after is None or last:
                stage.state = S.STAGE_FAILED
                stage.finished_at.CopyFrom(_now())
                self._save(job, S.STAGE_STATE_CHANGED, name, message)
                raise _StageFailed(name, message)
            STAGE_RETRIES.labels(spec.name, name).inc()
            stage.state = S.STAGE_PENDING
            self._save(job, S.LOG, name, f"{message}; retrying in {retry_after:.1f}s")
            await asyncio.sleep(retry_after)
        raise _StageFailed(name, "no attempts left")
