"""``dramaturg job submit|get|watch|cancel|list``: a client of the gateway."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import mimetypes
import sys
from pathlib import Path
from typing import Any

import grpc
from dramaturg.common.v1 import common_pb2
from dramaturg.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from dramaturg.shared.config import dramaturg_home
from dramaturg.shared.grpc.client import open_channel
from dramaturg.shared.grpc.errors import details_from_error
from google.protobuf import json_format, struct_pb2
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console(stderr=True)
ENCODINGS = {".wav": common_pb2.WAV, ".flac": common_pb2.FLAC, ".ogg": common_pb2.OGG, ".mp3": common_pb2.MP3}


def gateway_target(explicit: str | None) -> str:
    if explicit:
        return explicit
    from dramaturg.shared.cli.stack import Stack, stack_file

    path = stack_file(dramaturg_home())
    return Stack.load(path).gateway if path.exists() else "127.0.0.1:50051"


def api_token() -> str | None:
    from dramaturg.shared.tokens import resolve_token

    return resolve_token(None, dramaturg_home())


def audio_input(path: Path) -> common_pb2.AudioInput:
    if not path.is_file():
        raise SystemExit(f"no such audio file: {path}")
    encoding = ENCODINGS.get(path.suffix.lower(), common_pb2.AUDIO_ENCODING_UNSPECIFIED)
    mimetypes.guess_type(path.name)
    return common_pb2.AudioInput(encoding=encoding, content=path.read_bytes())


def parse_params(pairs: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--param expects KEY=VALUE, got {pair!r}")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def job_dict(job: gateway_pb2.Job) -> dict[str, Any]:
    return json_format.MessageToDict(job, preserving_proto_field_name=True)


def stage_table(job: gateway_pb2.Job) -> Table:
    table = Table(title=f"job {job.job_id} · {job.pipeline} · {gateway_pb2.JobState.Name(job.state)}")
    for col in ("stage", "service", "state", "attempts", "error"):
        table.add_column(col)
    for s in job.stages:
        table.add_row(
            s.name,
            s.service,
            gateway_pb2.StageState.Name(s.state).removeprefix("STAGE_"),
            str(s.attempts),
            s.error,
        )
    return table


async def watch_job(stub: gateway_pb2_grpc.GatewayStub, job_id: str, quiet: bool = False) -> gateway_pb2.Job:
    """Follow a job's events with a progress bar; return the job as it finished."""
    last: gateway_pb2.Job | None = None
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
        console=console,
        disable=quiet,
    ) as progress:
        task = progress.add_task(job_id, total=1.0, note="")
        async for event in stub.WatchJob(gateway_pb2.WatchJobRequest(job_id=job_id)):
            last = event.job
            note = f"{event.stage}: {event.message}" if event.stage else event.message
            progress.update(task, completed=event.job.progress, note=note[:60])
    if last is None:
        last = await stub.GetJob(gateway_pb2.GetJobRequest(job_id=job_id))
    return last


async def download_files(
    stub: gateway_pb2_grpc.GatewayStub, job: gateway_pb2.Job, folder: Path
) -> list[Path]:
    """Every file of ``job`` (GetJobFile) into ``folder``, each checked against its listed size and digest."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for entry in job.files:
        digest, size = hashlib.sha256(), 0
        target = folder / Path(entry.name).name  # a listed name, never a path
        partial = target.with_name(target.name + ".partial")
        with partial.open("wb") as out:
            request = gateway_pb2.GetJobFileRequest(job_id=job.job_id, name=entry.name)
            async for chunk in stub.GetJobFile(request):
                out.write(chunk.data)
                digest.update(chunk.data)
                size += len(chunk.data)
        if size != entry.size_bytes or digest.hexdigest() != entry.sha256:
            partial.unlink(missing_ok=True)
            raise OSError(f"{entry.name}: got {size} bytes that do not match the listed file; try again")
        partial.replace(target)
        written.append(target)
    return written


async def _run(args: argparse.Namespace) -> int:
    channel = open_channel(gateway_target(args.gateway), token=api_token())
    stub = gateway_pb2_grpc.GatewayStub(channel)
    try:
        if args.job_command == "submit":
            params = struct_pb2.Struct()
            params.update(parse_params(args.param))
            job = await stub.SubmitJob(
                gateway_pb2.SubmitJobRequest(
                    pipeline=args.pipeline,
                    audio=audio_input(Path(args.audio)),
                    params=params,
                    request_id=args.request_id or "",
                )
            )
            console.print(f"submitted job [bold]{job.job_id}[/] ({job.pipeline})")
            if args.watch:
                job = await watch_job(stub, job.job_id)
            print(json.dumps(job_dict(job), indent=2))
            return 0 if job.state != gateway_pb2.FAILED else 1
        if args.job_command == "get":
            job = await stub.GetJob(gateway_pb2.GetJobRequest(job_id=args.job_id))
            if args.output:
                for path in await download_files(stub, job, Path(args.output)):
                    console.print(f"wrote {path}")
            print(json.dumps(job_dict(job), indent=2))
        elif args.job_command == "watch":
            job = await watch_job(stub, args.job_id)
            console.print(stage_table(job))
            print(json.dumps(job_dict(job).get("result", {}), indent=2))
        elif args.job_command == "cancel":
            job = await stub.CancelJob(gateway_pb2.CancelJobRequest(job_id=args.job_id))
            console.print(f"job {job.job_id}: {gateway_pb2.JobState.Name(job.state)}")
        elif args.job_command == "list":
            reply = await stub.ListJobs(gateway_pb2.ListJobsRequest(page_size=args.limit))
            table = Table()
            for col in ("job", "pipeline", "state", "progress", "created"):
                table.add_column(col)
            for job in reply.jobs:
                table.add_row(
                    job.job_id,
                    job.pipeline,
                    gateway_pb2.JobState.Name(job.state),
                    f"{job.progress:.0%}",
                    job.created_at.ToDatetime().isoformat(timespec="seconds"),
                )
            Console().print(table)
        return 0
    except grpc.aio.AioRpcError as exc:
        detail = details_from_error(exc)
        print(f"error: {exc.code().name}: {detail.message}", file=sys.stderr)
        for field_path, description in detail.field_violations:
            print(f"  {field_path}: {description}", file=sys.stderr)
        return 1
    finally:
        await channel.close()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("job", help="submit, follow and manage gateway jobs")
    p.add_argument("--gateway", help="host:port (default: the running `dramaturg up` stack, else :50051)")
    jobs = p.add_subparsers(dest="job_command", required=True)
    s = jobs.add_parser("submit", help="submit an audio file to a pipeline")
    s.add_argument("audio")
    s.add_argument("--pipeline", default="probe")
    s.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--request-id", help="idempotency key")
    s.add_argument("--watch", action="store_true", help="follow the job until it ends")
    for name in ("get", "watch", "cancel"):
        c = jobs.add_parser(name)
        c.add_argument("job_id")
        if name == "get":
            c.add_argument("--output", metavar="DIR", help="also download the job's files (report, script, "
                           "timeline) into DIR")
    ls = jobs.add_parser("list")
    ls.add_argument("--limit", type=int, default=20)
    p.set_defaults(func=lambda args: asyncio.run(_run(args)))
