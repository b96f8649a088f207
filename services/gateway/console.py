"""The gateway's web console: jobs in a browser, served by the gateway process behind its API token.

A Starlette app run by uvicorn as one more task on the gateway's own event loop, next to the grpc.aio
server (:class:`ConsoleServer`), so its handlers call the in-process :class:`JobEngine` directly — the
same calls the gRPC servicer makes, with the same errors — and no second process, port-forward or
client library sits between the browser and the jobs. Pages are rendered on the server (every value
escaped); one small script (``console/console.js``) follows a running job over server-sent events fed
by ``JobEngine.watch``, the stream behind WatchJob.

What it offers: sign in with the API token; the job list; submit a scene (an uploaded file, a
pipeline, optional JSON params); a job's live progress; a scene report (``report.json`` of
``analyze_scene`` or ``revoice_scene``) as a table with one row per line — speaker, character, words,
per-dimension scores, an audio player for the original line and, for re-voiced lines, the new take —
with the timeline and the job's files.

Security: every path but the sign-in page and its stylesheet needs the token, either as
``Authorization: Bearer <token>`` or as the session cookie the sign-in sets (HttpOnly, SameSite=Strict,
an HMAC of the token and its issue time: no server-side session state, and a new token ends every
session). Pages answer a redirect to the sign-in, everything else 401. Writes from another origin are
refused, pages and job files carry a Content-Security-Policy (job files may hold what models wrote),
and every answer is ``Cache-Control: no-store``.

The original audio of a line is cut from the job's decoded input, which the engine hard-links into the
job's folder at submit (``engine.SCENE_AUDIO_FILE``), so it outlives the blob the stages read.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import html
import json
import logging
import re
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import grpc
import uvicorn
from dramaturg.common.v1 import common_pb2
from dramaturg.gateway.v1 import gateway_pb2
from dramaturg.services.gateway.engine import INPUT_FILE, SCENE_AUDIO_FILE, JobEngine, JobInput
from dramaturg.services.gateway.store import TERMINAL_STATES
from dramaturg.shared.grpc.errors import ServiceError, failed_precondition, invalid_argument, not_found
from google.protobuf import json_format, timestamp_pb2
from starlette.applications import Starlette
from starlette.datastructures import Headers, MutableHeaders, UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

S = gateway_pb2
ASSETS = Path(__file__).with_name("console")  # console.css, console.js
COOKIE = "dramaturg_console"
REPORT_FILE = "report.json"
REVOICED_FILE = "revoiced.wav"
# Reachable without the token: the sign-in page (GET and its POST), the stylesheet it uses, no icon.
OPEN_PATHS = frozenset({"/signin", "/static/console.css", "/favicon.ico"})
STATIC_FILES = {"console.css": "text/css; charset=utf-8", "console.js": "text/javascript; charset=utf-8"}
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# A comment line on a quiet event stream now and then, so proxies and browsers keep it open.
HEARTBEAT_SECONDS = 15.0
# How long stopping the console waits for open answers (an event stream is told to end at once).
SHUTDOWN_GRACE_SECONDS = 5.0
FORM_OVERHEAD_BYTES = 1024 * 1024  # an upload's form around the file: boundaries, pipeline, params
MAX_REPORT_BYTES = 64 * 1024 * 1024  # a report.json larger than this is not rendered (a link still is)
MAX_LINE_SECONDS = 600.0  # the longest line the console crops into a WAV
WAV_HEADER_PROBE_BYTES = 64 * 1024  # read to find a WAV's fmt and data chunks
JOB_STATES = [name for name in S.JobState.keys() if name != "JOB_STATE_UNSPECIFIED"]  # noqa: SIM118
JOB_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_PAGE_RE = re.compile(r"^/(submit|jobs/[^/]+(/report)?)?$")
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; media-src 'self'; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
            "frame-ancestors 'none'")
# Job files are shown as they are (script.html, timeline.svg): no script runs in them, whatever a model wrote.
FILE_CSP = "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; frame-ancestors 'none'"

_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.CANCELLED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


class _TooLarge(Exception):
    """An upload past the console's limit, found while it streams in."""


def http_status(code: grpc.StatusCode) -> int:
    """The HTTP status for an engine error's gRPC code (500 for one a client cannot act on)."""
    return _HTTP_STATUS.get(code, 500)


def is_page(path: str) -> bool:
    """Whether ``path`` is an HTML page (answered with a sign-in redirect or an error page, not JSON)."""
    return bool(_PAGE_RE.match(path))


# ================================================================================================ auth


class ConsoleAuth:
    """The API token, checked as a bearer header or through the session cookie the sign-in sets.

    The cookie is ``<issued>.<HMAC-SHA256(key, issued)>`` with a key derived from the token: it never
    holds the token, needs no server-side state (a gateway restart keeps people signed in), expires
    after ``session_seconds``, and a changed token invalidates every session at once.
    """

    def __init__(self, token: str, session_seconds: float) -> None:
        if not token:
            raise ValueError("the console needs the gateway's API token")
        self._token = token.encode()
        self._key = hashlib.sha256(b"dramaturg-console-session\0" + self._token).digest()
        self.session_seconds = session_seconds

    def check_token(self, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self._token)

    def _signature(self, issued: int) -> str:
        return hmac.new(self._key, f"session:{issued}".encode(), hashlib.sha256).hexdigest()

    def new_session(self, now: float | None = None) -> str:
        issued = int(time.time() if now is None else now)
        return f"{issued}.{self._signature(issued)}"

    def valid_session(self, value: str, now: float | None = None) -> bool:
        issued_text, _, signature = value.partition(".")
        if not issued_text.isdigit() or not signature:
            return False
        issued = int(issued_text)
        if not hmac.compare_digest(signature.encode(), self._signature(issued).encode()):
            return False
        age = (time.time() if now is None else now) - issued
        return -60 <= age <= self.session_seconds  # a minute of clock skew between gateway restarts

    def allows(self, headers: Headers, cookies: dict[str, str]) -> bool:
        scheme, _, presented = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and self.check_token(presented.strip()):
            return True
        session = cookies.get(COOKIE)
        return bool(session) and self.valid_session(session)


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a path on this console only (never ``//host`` or a URL)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    parts = urlsplit(target)
    return "/" if parts.scheme or parts.netloc else target


def _same_origin(headers: Headers) -> bool:
    """Whether a write comes from the console's own pages: the Origin (when the browser sends one)
    names this host, and Fetch Metadata does not say cross-site. Clients without either (curl with a
    bearer token) are not browsers and cannot be tricked into a request."""
    if headers.get("sec-fetch-site", "") == "cross-site":
        return False
    origin = headers.get("origin")
    if origin is None:
        return True
    return origin != "null" and urlsplit(origin).netloc == headers.get("host", "")


class Guard:
    """ASGI middleware around the whole app: the token on every path but :data:`OPEN_PATHS`, no write
    from another origin, and the security headers on every answer."""

    def __init__(self, app: ASGIApp, auth: ConsoleAuth) -> None:
        self.app = app
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan (off under uvicorn); the console has no websockets
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        path, method = scope["path"], scope["method"]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("content-security-policy", PAGE_CSP)
                headers.setdefault("cache-control", "no-store")
                headers.setdefault("x-content-type-options", "nosniff")
                headers.setdefault("x-frame-options", "DENY")
                headers.setdefault("referrer-policy", "same-origin")
            await send(message)

        if method not in SAFE_METHODS and not _same_origin(request.headers):
            response: Response = JSONResponse(
                {"error": "refused: a write from another origin", "code": "PERMISSION_DENIED"}, 403)
        elif path in OPEN_PATHS or self.auth.allows(request.headers, request.cookies):
            await self.app(scope, receive, send_with_headers)
            return
        elif method in ("GET", "HEAD") and is_page(path):
            wanted = path + (f"?{scope['query_string'].decode('latin-1')}" if scope["query_string"] else "")
            response = RedirectResponse(f"/signin?{urlencode({'next': wanted})}", status_code=303)
        else:
            response = JSONResponse(
                {"error": "sign in first: send 'Authorization: Bearer <token>' (the gateway's API token) "
                          "or sign in at /signin", "code": "UNAUTHENTICATED"},
                status_code=401, headers={"www-authenticate": 'Bearer realm="dramaturg"'})
        await response(scope, receive, send_with_headers)


# ============================================================================================ WAV crops


@dataclass(frozen=True)
class WavLayout:
    """Where a PCM WAV's samples are: enough to copy a span of frames without decoding anything."""

    fmt: bytes  # the fmt chunk's body, copied into the crop as it is
    channels: int
    sample_rate: int
    block_align: int  # bytes per frame
    data_offset: int
    data_bytes: int


def parse_wav_header(head: bytes, total_size: int) -> WavLayout:
    """The layout of a WAV from its first bytes (PCM or float, plain or extensible); ValueError else."""
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        raise ValueError("not a WAV file")
    position, fmt = 12, b""
    while position + 8 <= len(head):
        chunk, size = head[position:position + 4], struct.unpack_from("<I", head, position + 4)[0]
        body = position + 8
        if chunk == b"fmt ":
            fmt = head[body:body + size]
        elif chunk == b"data":
            if len(fmt) < 16:
                raise ValueError("a WAV whose data comes before its format")
            tag, channels, rate, _byte_rate, align, _bits = struct.unpack_from("<HHIIHH", fmt)
            if tag not in (1, 3, 0xFFFE) or not align or not rate:
                raise ValueError(f"WAV format {tag:#x} is not PCM")
            data = min(size, max(total_size - body, 0))  # a streamed WAV may say more than it has
            return WavLayout(fmt, channels, rate, align, body, data - data % align)
        position = body + size + (size & 1)
    raise ValueError(f"no data chunk in the WAV's first {len(head)} bytes")


def wav_file(layout: WavLayout, frames: bytes) -> bytes:
    """A WAV of ``frames`` in ``layout``'s format."""
    fmt = layout.fmt + b"\0" * (len(layout.fmt) & 1)
    pad = b"\0" * (len(frames) & 1)
    riff = 4 + 8 + len(fmt) + 8 + len(frames) + len(pad)
    return (b"RIFF" + struct.pack("<I", riff) + b"WAVE" + b"fmt " + struct.pack("<I", len(layout.fmt)) + fmt
            + b"data" + struct.pack("<I", len(frames)) + frames + pad)


Reader = Callable[[int, int], Awaitable[bytes]]  # (offset, length) → bytes


async def crop_wav(read: Reader, total_size: int, start: float, end: float) -> bytes:
    """``[start, end)`` seconds of a WAV read piecewise through ``read``: its header, then only the span.

    Frames are rounded as the pipelines crop lines (``round(t * rate)``), so the console plays exactly
    what the stages heard.
    """
    if not end - start <= MAX_LINE_SECONDS:
        raise invalid_argument("line", f"{end - start:.0f} s is longer than the console plays "
                                       f"({MAX_LINE_SECONDS:g} s)")
    try:
        layout = parse_wav_header(await read(0, WAV_HEADER_PROBE_BYTES), total_size)
    except ValueError as exc:
        raise failed_precondition(f"the audio cannot be cropped: {exc}", reason="NOT_PCM_WAV") from None
    frames = layout.data_bytes // layout.block_align
    first = min(max(round(start * layout.sample_rate), 0), frames)
    last = min(max(round(end * layout.sample_rate), first), frames)
    if last <= first:
        raise invalid_argument("line", f"[{start:g}, {end:g}) s is outside the audio "
                                       f"({frames / layout.sample_rate:.3f} s long)")
    data = await read(layout.data_offset + first * layout.block_align, (last - first) * layout.block_align)
    return wav_file(layout, data)


def _read_range(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(length)


# ============================================================================================ rendering


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _score(value: Any) -> str:
    return "—" if value is None else f"{float(value):.2f}"


def _time(stamp: timestamp_pb2.Timestamp) -> str | None:
    if not stamp.seconds and not stamp.nanos:
        return None
    return stamp.ToDatetime(tzinfo=UTC).isoformat(timespec="seconds")


def _human_time(stamp: timestamp_pb2.Timestamp) -> str:
    if not stamp.seconds and not stamp.nanos:
        return "—"
    return stamp.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover - the loop returns


def job_state(job: gateway_pb2.Job) -> str:
    return S.JobState.Name(job.state)


def stage_state(stage: gateway_pb2.Stage) -> str:
    return S.StageState.Name(stage.state).removeprefix("STAGE_")


def file_url(job_id: str, name: str) -> str:
    return f"/jobs/{quote(job_id)}/files/{quote(name)}"


def has_report(job: gateway_pb2.Job) -> bool:
    return job.state == S.SUCCEEDED and any(f.name == REPORT_FILE for f in job.files)


def job_summary(job: gateway_pb2.Job) -> dict[str, Any]:
    """A job as the console's JSON and its event stream show it."""
    return {
        "job_id": job.job_id,
        "pipeline": job.pipeline,
        "state": job_state(job),
        "terminal": job.state in TERMINAL_STATES,
        "progress": round(job.progress, 4),
        "error": job.error,
        "labels": dict(job.labels),
        "created_at": _time(job.created_at),
        "finished_at": _time(job.finished_at),
        "stages": [{"name": s.name, "service": s.service, "state": stage_state(s),
                    "progress": round(s.progress, 4), "attempts": s.attempts, "error": s.error}
                   for s in job.stages],
        "files": [{"name": f.name, "size_bytes": f.size_bytes, "content_type": f.content_type,
                   "url": file_url(job.job_id, f.name)} for f in job.files],
        "url": f"/jobs/{quote(job.job_id)}",
        "report_url": f"/jobs/{quote(job.job_id)}/report" if has_report(job) else None,
    }


def _state_badge(state: str, element_id: str = "") -> str:
    attr = f' id="{element_id}"' if element_id else ""
    return f'<span{attr} class="state state-{esc(state.lower())}">{esc(state)}</span>'


def _progress(value: float, element_id: str = "") -> str:
    attr = f' id="{element_id}"' if element_id else ""
    return f'<progress{attr} max="1" value="{value:.4f}">{value * 100:.0f}%</progress>'


def layout(title: str, body: str, *, signed_in: bool = True, script: bool = False) -> str:
    nav = ('<nav><a href="/">Jobs</a> <a href="/submit">Submit a scene</a> '
           '<form method="post" action="/signout" class="inline"><button type="submit">Sign out</button>'
           '</form></nav>') if signed_in else ""
    js = '<script src="/static/console.js" defer></script>' if script else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)} · dramaturg</title><link rel="stylesheet" href="/static/console.css">{js}</head>
<body><header><a class="brand" href="/">dramaturg</a>{nav}</header>
<main>
{body}
</main></body></html>
"""


def page(title: str, body: str, status: int = 200, **kw: Any) -> HTMLResponse:
    return HTMLResponse(layout(title, body, **kw), status_code=status)


def report_kind(report: dict[str, Any]) -> str:
    """``scene`` (analyze_scene: a script of turns), ``revoice`` (revoice_scene) or ``other``."""
    if isinstance(report.get("script"), list):
        return "scene"
    if isinstance(report.get("lines"), list) and "replaced" in report:
        return "revoice"
    return "other"


def report_lines(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The report's lines in the order the console numbers them (``/jobs/ID/lines/N/...``): a scene's
    turns; a re-voicing's selected lines, then those it passed over."""
    kind = report_kind(report)
    if kind == "scene":
        lines = report["script"]
    elif kind == "revoice":
        lines = list(report["lines"]) + list(report.get("passed_over") or [])
    else:
        return []
    return [line for line in lines if isinstance(line, dict)]


# ============================================================================================== the app


class Console:
    """The console's routes over one :class:`JobEngine` (see the module docstring)."""

    def __init__(self, engine: JobEngine, token: str, *, session_seconds: float = 12 * 3600.0,
                 max_upload_bytes: int = 64 * 1024 * 1024) -> None:
        self.engine = engine
        self.auth = ConsoleAuth(token, session_seconds)
        self.max_upload_bytes = max_upload_bytes
        self.closing = asyncio.Event()  # set when the console stops: event streams end
        self._reports: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()
        self.app = Starlette(
            routes=[
                Route("/signin", self.signin, methods=["GET", "POST"]),
                Route("/signout", self.signout, methods=["POST"]),
                Route("/static/{name}", self.static),
                Route("/favicon.ico", self.favicon),
                Route("/", self.jobs_page),
                Route("/submit", self.submit, methods=["GET", "POST"]),
                Route("/jobs/{job_id}", self.job_page),
                Route("/jobs/{job_id}/cancel", self.cancel, methods=["POST"]),
                Route("/jobs/{job_id}/report", self.report_page),
                Route("/jobs/{job_id}/files/{name}", self.job_file),
                Route("/jobs/{job_id}/lines/{line:int}/audio", self.line_audio),
                Route("/jobs/{job_id}/lines/{line:int}/revoiced", self.line_revoiced),
                Route("/api/pipelines", self.api_pipelines),
                Route("/api/jobs", self.api_jobs),
                Route("/api/jobs/{job_id}", self.api_job),
                Route("/api/jobs/{job_id}/events", self.api_events),
            ],
            middleware=[Middleware(Guard, auth=self.auth)],
            exception_handlers={ServiceError: self._service_error},
        )

    # -- errors ------------------------------------------------------------------------------------
    async def _service_error(self, request: Request, exc: Exception) -> Response:
        """An engine error with its message: an error page for pages, JSON for everything else."""
        assert isinstance(exc, ServiceError)
        status = http_status(exc.code)
        headers = {}
        if exc.retry_after_seconds:
            headers["retry-after"] = str(max(1, round(exc.retry_after_seconds)))
        if status >= 500 and exc.code != grpc.StatusCode.UNAVAILABLE:
            log.warning("console %s %s: %s", request.method, request.url.path, exc)
        if is_page(request.url.path):
            body = (f"<h1>{status}: {esc(exc.code.name.replace('_', ' ').lower())}</h1>"
                    f'<p class="error" id="error">{esc(exc.message)}</p>'
                    '<p><a href="/">Back to the jobs</a></p>')
            response: Response = page("Error", body, status)
            response.headers.update(headers)
            return response
        return JSONResponse({"error": exc.message, "code": exc.code.name, "reason": exc.reason},
                            status_code=status, headers=headers)

    # -- sign-in -------------------------------------------------------------------------------------
    def _signin_page(self, next_path: str, error: str = "", status: int = 200) -> HTMLResponse:
        message = f'<p class="error" id="error">{esc(error)}</p>' if error else ""
        body = f"""<h1>Sign in</h1>{message}
<form method="post" action="/signin" class="card">
<input type="hidden" name="next" value="{esc(next_path)}">
<label>API token
<input type="password" name="token" autocomplete="current-password" required autofocus></label>
<button type="submit">Sign in</button>
</form>
<p class="hint">The gateway's API token: <code>DRAMATURG_API_TOKEN</code>, <code>api_token</code> in its
config, or <code>$DRAMATURG_HOME/api-token</code> (<code>dramaturg up</code> writes one).</p>"""
        return page("Sign in", body, status, signed_in=False)

    async def signin(self, request: Request) -> Response:
        if request.method == "GET":
            next_path = safe_next(request.query_params.get("next"))
            if self.auth.allows(request.headers, request.cookies):
                return RedirectResponse(next_path, status_code=303)
            return self._signin_page(next_path)
        form = await request.form(max_files=0, max_fields=4)
        next_path = safe_next(str(form.get("next") or "/"))
        if not self.auth.check_token(str(form.get("token") or "")):
            log.info("console: a sign-in with a wrong token from %s",
                     request.client.host if request.client else "?")
            return self._signin_page(next_path, "That is not this gateway's API token.", 401)
        response = RedirectResponse(next_path, status_code=303)
        response.set_cookie(COOKIE, self.auth.new_session(), max_age=int(self.auth.session_seconds),
                            path="/", httponly=True, samesite="strict", secure=request.url.scheme == "https")
        return response

    async def signout(self, request: Request) -> Response:
        response = RedirectResponse("/signin", status_code=303)
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return response

    async def favicon(self, request: Request) -> Response:
        """No icon: an empty answer, so browsers stop asking (and log no error)."""
        return Response(status_code=204, headers={"cache-control": "max-age=86400"})

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC_FILES:
            raise not_found("file", name)
        return FileResponse(ASSETS / name, media_type=STATIC_FILES[name],
                            headers={"cache-control": "no-cache"})

    # -- the job list --------------------------------------------------------------------------------
    @staticmethod
    def _state_filter(name: str) -> int:
        if not name:
            return S.JOB_STATE_UNSPECIFIED
        try:
            return S.JobState.Value(name.upper())
        except ValueError:
            known = ", ".join(JOB_STATES)
            raise invalid_argument("state", f"unknown job state {name!r}; known: {known}") from None

    def _list(self, request: Request, page_size: int = 50) -> gateway_pb2.ListJobsResponse:
        query = request.query_params
        try:
            size = int(query.get("page_size") or page_size)
        except ValueError:
            raise invalid_argument("page_size", "an integer") from None
        return self.engine.list(gateway_pb2.ListJobsRequest(
            page_size=size, page_token=query.get("page_token", ""),
            state=self._state_filter(query.get("state", "")), pipeline=query.get("pipeline", "")))

    async def jobs_page(self, request: Request) -> Response:
        listed = self._list(request)
        query = request.query_params
        rows = []
        for job in listed.jobs:
            link = f"/jobs/{quote(job.job_id)}"
            report = f'<a href="{link}/report">report</a>' if has_report(job) else ""
            rows.append(
                f'<tr data-job="{esc(job.job_id)}">'
                f'<td><a href="{link}"><code>{esc(job.job_id)}</code></a></td>'
                f"<td>{esc(job.pipeline)}</td><td>{esc(job.labels.get('file', ''))}</td>"
                f"<td>{_state_badge(job_state(job))}</td><td>{_progress(job.progress)}</td>"
                f"<td>{esc(_human_time(job.created_at))}</td><td>{report}</td></tr>")
        chosen = query.get("state", "").upper()
        states = "".join(f'<option{" selected" if chosen == n else ""}>{esc(n)}</option>' for n in JOB_STATES)
        pipelines = "".join(
            f'<option{" selected" if query.get("pipeline") == n else ""}>{esc(n)}</option>'
            for n in sorted(self.engine.pipelines))
        more = ""
        if listed.next_page_token:
            params = {k: v for k, v in query.items() if k != "page_token"} | {
                "page_token": listed.next_page_token}
            more = f'<p><a href="/?{esc(urlencode(params))}">Older jobs →</a></p>'
        table = ("<table><thead><tr><th>job</th><th>pipeline</th><th>file</th><th>state</th><th>progress</th>"
                 f"<th>created</th><th></th></tr></thead><tbody id=\"jobs\">{''.join(rows)}</tbody></table>"
                 if rows else '<p id="jobs">No jobs yet: <a href="/submit">submit a scene</a>.</p>')
        body = f"""<h1>Jobs</h1>
<form method="get" action="/" class="filters">
<label>state <select name="state"><option value="">any</option>{states}</select></label>
<label>pipeline <select name="pipeline"><option value="">any</option>{pipelines}</select></label>
<button type="submit">Filter</button></form>
{table}{more}"""
        return page("Jobs", body)

    # -- submitting ------------------------------------------------------------------------------------
    def _submit_page(self, error: str = "", status: int = 200, chosen: str = "",
                     params: str = "") -> Response:
        options, described = [], []
        for name, spec in sorted(self.engine.pipelines.items()):
            options.append(f'<option{" selected" if name == chosen else ""}>{esc(name)}</option>')
            stages = " → ".join(s.name for s in spec.stages)
            known = ", ".join(sorted(spec.params)) or "none"
            described.append(f"<dt>{esc(name)}</dt><dd>{esc(spec.description)}<br>"
                             f"<small>stages: {esc(stages)}; params: {esc(known)}</small></dd>")
        message = f'<p class="error" id="error">{esc(error)}</p>' if error else ""
        body = f"""<h1>Submit a scene</h1>{message}
<form method="post" action="/submit" enctype="multipart/form-data" class="card">
<label>Scene audio <input type="file" name="audio" accept="audio/*,.wav,.flac,.mp3,.ogg" required></label>
<label>Pipeline <select name="pipeline" required>{''.join(options)}</select></label>
<label>Params (JSON, optional)
<textarea name="params" rows="4" placeholder='{{"num_speakers": 2}}'>{esc(params)}</textarea></label>
<button type="submit">Submit</button>
</form>
<p class="hint">Up to {_size(self.max_upload_bytes)} of audio in any format the gateway decodes.</p>
<h2>Pipelines</h2><dl>{''.join(described)}</dl>"""
        return page("Submit a scene", body, status)

    async def submit(self, request: Request) -> Response:
        if request.method == "GET":
            return self._submit_page(chosen=request.query_params.get("pipeline", ""))
        too_large = (f"The file is larger than this gateway accepts ({_size(self.max_upload_bytes)}, "
                     "its server.max_message_bytes).")
        limit = self.max_upload_bytes + FORM_OVERHEAD_BYTES
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return self._submit_page(too_large, 413)  # refused before a byte of it is read
        received = 0

        async def receive_at_most() -> Message:  # a body without a length is counted as it comes
            nonlocal received
            message = await request.receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise _TooLarge
            return message

        try:
            form = await Request(request.scope, receive_at_most).form(max_files=1, max_fields=8)
        except _TooLarge:
            return self._submit_page(too_large, 413)
        except HTTPException as exc:  # a malformed form
            return self._submit_page(f"The form could not be read: {exc.detail}", exc.status_code)
        try:
            pipeline = str(form.get("pipeline") or "")
            params_text = str(form.get("params") or "").strip()
            upload = form.get("audio")
            try:
                params = json.loads(params_text) if params_text else {}
            except ValueError as exc:
                return self._submit_page(f"params: not JSON ({exc})", 400, pipeline, params_text)
            if not isinstance(params, dict):
                return self._submit_page("params: a JSON object, e.g. {\"num_speakers\": 2}", 400, pipeline,
                                         params_text)
            if not isinstance(upload, UploadFile) or not upload.filename:
                return self._submit_page("Choose a scene file to upload.", 400, pipeline, params_text)
            if upload.size is not None and upload.size > self.max_upload_bytes:
                return self._submit_page(f"The file is larger than this gateway accepts "
                                         f"({_size(self.max_upload_bytes)}).", 413, pipeline, params_text)
            content = await upload.read()
        finally:
            await form.close()
        message = gateway_pb2.SubmitJobRequest(
            pipeline=pipeline, audio=common_pb2.AudioInput(content=content),
            labels={"source": "console", "file": upload.filename[-200:]})
        try:
            message.params.update(params)
        except (ValueError, TypeError) as exc:
            return self._submit_page(f"params: {exc}", 400, pipeline, params_text)
        try:
            job = await self.engine.submit(message)
        except ServiceError as exc:
            return self._submit_page(exc.message, http_status(exc.code), pipeline, params_text)
        log.info("console: job %s (%s) submitted from %s", job.job_id, job.pipeline, upload.filename[-200:])
        return RedirectResponse(f"/jobs/{quote(job.job_id)}", status_code=303)

    def _job_input(self, job_id: str) -> JobInput | None:
        try:
            return JobInput.from_json(json.loads((self.engine.work_root / job_id / INPUT_FILE).read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _original_path(self, job_id: str) -> Path | None:
        """The job's decoded input: the engine's link in the job folder, else its blob while it exists."""
        kept = self.engine.work_root / job_id / SCENE_AUDIO_FILE
        if kept.is_file():
            return kept
        stored = self._job_input(job_id)
        ref = self.engine.blobs.get(stored.digest, stored.suffix) if stored is not None else None
        return ref.path if ref is not None else None

    # -- a job ---------------------------------------------------------------------------------------
    def _job(self, request: Request) -> gateway_pb2.Job:
        job_id = request.path_params["job_id"]
        if not JOB_ID_RE.match(job_id):
            raise not_found("job", job_id)
        return self.engine.get(job_id)

    async def job_page(self, request: Request) -> Response:
        job = self._job(request)
        summary = job_summary(job)
        link = f"/jobs/{quote(job.job_id)}"
        stages = "".join(
            f'<tr data-stage="{esc(s["name"])}"><td>{esc(s["name"])}</td><td>{esc(s["service"])}</td>'
            f'<td class="stage-state">{_state_badge(s["state"])}</td>'
            f'<td class="stage-progress">{_progress(s["progress"])}</td>'
            f'<td class="stage-attempts">{s["attempts"]}</td>'
            f'<td class="stage-error">{esc(s["error"])}</td></tr>'
            for s in summary["stages"])
        files = "".join(f'<li><a href="{esc(f["url"])}">{esc(f["name"])}</a> ({_size(f["size_bytes"])})</li>'
                        for f in summary["files"])
        watch = "" if summary["terminal"] else f' data-events="/api/jobs/{quote(job.job_id)}/events"'
        cancel = ("" if summary["terminal"] else
                  f'<form method="post" action="{link}/cancel" id="cancel" class="inline">'
                  '<button type="submit">Cancel the job</button></form>')
        report_hidden = "" if summary["report_url"] else " hidden"
        params = json_format.MessageToDict(job.params)
        shown = esc(json.dumps(params, ensure_ascii=False)) if params else "—"
        watching = "finished" if summary["terminal"] else "live"
        state = _state_badge(summary["state"], "job-state")
        body = f"""<section id="job" data-job="{esc(job.job_id)}"{watch} data-watch="{watching}">
<h1>Job <code>{esc(job.job_id)}</code></h1>
<p>{esc(job.pipeline)} · {state} {_progress(job.progress, "job-progress")}
<span id="job-percent">{job.progress * 100:.0f}%</span> · <span id="watch-status">{watching}</span></p>
<p class="error" id="job-error"{'' if job.error else ' hidden'}>{esc(job.error)}</p>
<p><a id="report-link" href="{link}/report"{report_hidden}>Open the report</a> {cancel}</p>
<dl class="meta"><dt>file</dt><dd>{esc(job.labels.get('file', '—'))}</dd>
<dt>created</dt><dd>{esc(_human_time(job.created_at))}</dd>
<dt>params</dt><dd><code>{shown}</code></dd></dl>
<h2>Stages</h2>
<table><thead><tr><th>stage</th><th>service</th><th>state</th><th>progress</th><th>attempts</th><th>error</th></tr></thead>
<tbody>{stages}</tbody></table>
<h2>Files</h2><ul id="job-files">{files}</ul>
{'' if summary["terminal"] else '<h2>Events</h2><ol id="events"></ol>'}
</section>"""
        return page(f"Job {job.job_id}", body, script=True)

    async def cancel(self, request: Request) -> Response:
        job = self._job(request)
        await self.engine.cancel(job.job_id)
        return RedirectResponse(f"/jobs/{quote(job.job_id)}", status_code=303)

    # -- job files -------------------------------------------------------------------------------------
    async def _read_job_file(self, job_id: str, name: str, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes of a job file from ``offset``, through the engine's GetJobFile reader."""
        out = bytearray()
        async with contextlib.aclosing(self.engine.read_file(job_id, name, offset)) as chunks:
            async for chunk in chunks:
                out += chunk.data
                if len(out) >= length:
                    break
        return bytes(out[:length])

    async def job_file(self, request: Request) -> Response:
        """A job file, streamed; one byte range (``Range: bytes=a-b``) for players and resumed downloads."""
        job = self._job(request)
        name = request.path_params["name"]
        entry = next((f for f in job.files if f.name == name), None)
        if entry is None:
            listed = ", ".join(f.name for f in job.files) or "none (it has not finished, or wrote none)"
            raise not_found("file", f"{job.job_id}/{name}", f"the job's files: {listed}")
        size = entry.size_bytes
        first, last, status = 0, max(size - 1, 0), 200
        wanted = re.fullmatch(r"bytes=(\d*)-(\d*)", request.headers.get("range", "").strip())
        if wanted and (wanted[1] or wanted[2]):
            if wanted[1]:
                first, last = int(wanted[1]), min(int(wanted[2]) if wanted[2] else size - 1, size - 1)
            else:
                first, last = max(size - int(wanted[2]), 0), size - 1
            if first >= size or first > last:
                return Response(status_code=416, headers={"content-range": f"bytes */{size}"})
            status = 206
        length = last - first + 1 if size else 0
        chunks = self.engine.read_file(job.job_id, name, first)
        head = await anext(chunks)  # an engine error surfaces here, before any byte is sent

        async def body() -> AsyncIterator[bytes]:
            try:
                chunk, left = head, length
                while left > 0:
                    data = chunk.data[:left]
                    left -= len(data)
                    if data:
                        yield data
                    if left <= 0:
                        break
                    try:
                        chunk = await anext(chunks)
                    except StopAsyncIteration:
                        break
            finally:
                await chunks.aclose()

        disposition = "attachment" if request.query_params.get("download") else "inline"
        headers = {"accept-ranges": "bytes", "content-length": str(length),
                   "content-security-policy": FILE_CSP,
                   "content-disposition": f"{disposition}; filename*=UTF-8''{quote(name)}"}
        if status == 206:
            headers["content-range"] = f"bytes {first}-{last}/{size}"
        return StreamingResponse(body(), status_code=status, headers=headers,
                                 media_type=entry.content_type or "application/octet-stream")

    async def _report(self, job: gateway_pb2.Job) -> dict[str, Any]:
        """The job's parsed report.json (cached by its digest: every line's audio request needs it)."""
        entry = next((f for f in job.files if f.name == REPORT_FILE), None)
        if entry is None or job.state != S.SUCCEEDED:
            raise not_found("report", job.job_id, f"the job is {job_state(job)}; reports are written by "
                                                  "analyze_scene and revoice_scene when they succeed")
        key = (job.job_id, entry.sha256)
        if key in self._reports:
            self._reports.move_to_end(key)
            return self._reports[key]
        if entry.size_bytes > MAX_REPORT_BYTES:
            raise failed_precondition(f"{REPORT_FILE} is {_size(entry.size_bytes)}, more than the console "
                                      f"renders; download it from {file_url(job.job_id, REPORT_FILE)}")
        data = await self._read_job_file(job.job_id, REPORT_FILE, 0, entry.size_bytes)
        try:
            report = await asyncio.to_thread(json.loads, data)
        except ValueError as exc:
            raise failed_precondition(f"{REPORT_FILE} is not JSON: {exc}") from None
        if not isinstance(report, dict):
            raise failed_precondition(f"{REPORT_FILE} is not a JSON object")
        self._reports[key] = report
        while len(self._reports) > 16:
            self._reports.popitem(last=False)
        return report

    async def _line(self, request: Request) -> tuple[gateway_pb2.Job, dict[str, Any], int, float, float]:
        job = self._job(request)
        report = await self._report(job)
        lines = report_lines(report)
        n = request.path_params["line"]
        if not 0 <= n < len(lines):
            raise not_found("line", str(n), f"the report has {len(lines)} line(s), numbered from 0")
        line = lines[n]
        try:
            start, end = float(line["start"]), float(line["end"])
        except (KeyError, TypeError, ValueError):
            raise failed_precondition(f"line {n} of the report has no start and end") from None
        return job, line, n, start, end

    async def line_audio(self, request: Request) -> Response:
        """The original audio of one line: ``[start, end)`` of the job's decoded input, as a WAV."""
        job, _line, n, start, end = await self._line(request)
        path = await asyncio.to_thread(self._original_path, job.job_id)
        if path is None:
            raise not_found("original audio", job.job_id,
                            "the gateway deletes a job's decoded input when the job ends and could not "
                            "hard-link it into the job's folder (its jobs and blob folders are on different "
                            "file systems)")
        try:
            size = (await asyncio.to_thread(path.stat)).st_size
            wav = await crop_wav(lambda offset, length: asyncio.to_thread(_read_range, path, offset, length),
                                 size, start, end)
        except FileNotFoundError:
            raise not_found("original audio", job.job_id, "it was deleted just now (the job ended)") from None
        return Response(wav, media_type="audio/wav",
                        headers={"content-disposition": f'inline; filename="{job.job_id}-line{n}.wav"'})

    async def line_revoiced(self, request: Request) -> Response:
        """The re-voiced take of one line, cut from the job's ``revoiced.wav`` where it was spliced in."""
        job, line, n, start, end = await self._line(request)
        entry = next((f for f in job.files if f.name == REVOICED_FILE), None)
        if line.get("chosen") is None or entry is None:
            raise not_found("re-voiced take", f"{job.job_id}/line {n}",
                            str(line.get("reason") or "this line was not re-voiced"))

        async def read(offset: int, length: int) -> bytes:
            return await self._read_job_file(job.job_id, REVOICED_FILE, min(offset, entry.size_bytes), length)

        wav = await crop_wav(read, entry.size_bytes, start, end)
        name = f"{job.job_id}-line{n}-revoiced.wav"
        return Response(wav, media_type="audio/wav",
                        headers={"content-disposition": f'inline; filename="{name}"'})

    # -- the report ------------------------------------------------------------------------------------
    async def report_page(self, request: Request) -> Response:
        job = self._job(request)
        report = await self._report(job)
        kind = report_kind(report)
        names = {f.name for f in job.files}
        link = f"/jobs/{quote(job.job_id)}"
        head = [f'<h1>Report of job <a href="{link}"><code>{esc(job.job_id)}</code></a></h1>',
                f"<p>{esc(job.pipeline)} · {float(report.get('duration_seconds') or 0):.1f} s"
                f" · {esc(job.labels.get('file', ''))}</p>"]
        models = [f"{label}: <code>{esc(report[key])}</code>" for key, label in
                  (("diarization_model", "diarization"), ("transcription_model", "transcripts"),
                   ("evaluator_model", "acting scores")) if report.get(key)]
        if models:
            head.append(f"<p>Models — {'; '.join(models)}.</p>")
        for stage, reason in (report.get("skipped_stages") or {}).items():
            head.append(f'<p class="skip"><b>{esc(stage)} skipped:</b> {esc(reason)}</p>')
        timeline = next((n for n in ("timeline.svg", "timeline.png") if n in names), None)
        if timeline:
            head.append(f'<figure><img id="timeline" src="{file_url(job.job_id, timeline)}" '
                        'alt="timeline: who speaks when, coloured by mean acting score"></figure>')
        if kind == "scene":
            table = self._scene_table(job.job_id, report_lines(report))
        elif kind == "revoice":
            table = self._revoice_table(job.job_id, report, REVOICED_FILE in names)
        else:
            table = (f'<p>This report has no lines to show; see '
                     f'<a href="{file_url(job.job_id, REPORT_FILE)}">{REPORT_FILE}</a>.</p>')
        files = "".join(
            f'<li><a href="{file_url(job.job_id, f.name)}">{esc(f.name)}</a> ({_size(f.size_bytes)}, '
            f'<a href="{file_url(job.job_id, f.name)}?download=1">download</a>)</li>' for f in job.files)
        body = "\n".join(head) + f"\n{table}\n<h2>Files</h2><ul id=\"report-files\">{files}</ul>"
        return page(f"Report {job.job_id}", body)

    @staticmethod
    def _player(url: str, kind: str) -> str:
        return f'<audio controls preload="none" data-kind="{kind}" src="{esc(url)}"></audio>'

    def _scene_table(self, job_id: str, lines: list[dict[str, Any]]) -> str:
        dimensions = sorted({d for line in lines for d in (line.get("scores") or {})})
        head = "".join(f"<th>{esc(d.replace('_', ' '))}</th>" for d in dimensions)
        rows = []
        for n, line in enumerate(lines):
            scores = line.get("scores") or {}
            cells = "".join(f'<td class="num">{_score(scores.get(d))}</td>' for d in dimensions)
            rows.append(
                f'<tr data-line="{n}"><td class="num">{n}</td>'
                f'<td class="num">{float(line.get("start", 0)):.2f}–{float(line.get("end", 0)):.2f}</td>'
                f"<td>{esc(line.get('speaker', ''))}</td><td>{esc(line.get('voice_id') or '—')}</td>"
                f"<td>{esc(line.get('text') or '—')}</td>"
                f'<td class="num"><b>{_score(line.get("mean_score"))}</b></td>{cells}'
                f"<td>{self._player(f'/jobs/{quote(job_id)}/lines/{n}/audio', 'original')}</td></tr>")
        return ("<h2>Lines</h2><table id=\"lines\"><thead><tr><th>#</th><th>time (s)</th><th>speaker</th>"
                f"<th>character</th><th>line</th><th>mean</th>{head}<th>original</th></tr></thead>"
                f"<tbody>{''.join(rows)}</tbody></table>")

    def _revoice_table(self, job_id: str, report: dict[str, Any], has_scene: bool) -> str:
        lines = report_lines(report)
        dimensions = sorted({d for line in lines for part in ("before", "after")
                             for d in ((line.get(part) or {}).get("scores") or {})})
        head = "".join(f"<th>{esc(d.replace('_', ' '))}</th>" for d in dimensions)
        rows = []
        for n, line in enumerate(lines):
            before, after = line.get("before") or {}, line.get("after") or {}
            was, now = before.get("scores") or {}, after.get("scores") or {}
            cells = "".join(
                f'<td class="num">{_score(was.get(d))}{" → " + _score(now.get(d)) if after else ""}</td>'
                for d in dimensions)
            chosen = line.get("chosen")
            if chosen is not None:
                verdict = f"take {esc(chosen)}" + (f" ({esc(line['fit'])})" if line.get("fit") else "")
            elif "takes" in line:
                verdict = f"kept the original: {esc(line.get('reason', ''))}"
            else:  # not attempted (no character, no words)
                verdict = f"passed over: {esc(line.get('reason', ''))}"
            take = (self._player(f"/jobs/{quote(job_id)}/lines/{n}/revoiced", "revoiced")
                    if chosen is not None and has_scene else "—")
            source = f" <small>({esc(line['text_source'])})</small>" if line.get("text_source") else ""
            rows.append(
                f'<tr data-line="{n}"><td class="num">{esc(line.get("index", n))}</td>'
                f'<td class="num">{float(line.get("start", 0)):.2f}–{float(line.get("end", 0)):.2f}</td>'
                f"<td>{esc(line.get('speaker', ''))}</td><td>{esc(line.get('voice_id') or '—')}</td>"
                f"<td>{esc(line.get('text') or '—')}{source}</td>"
                f'<td class="num"><b>{_score(before.get("mean_score"))}</b>'
                f'{" → <b>" + _score(after.get("mean_score")) + "</b>" if after else ""}</td>{cells}'
                f"<td>{verdict}</td>"
                f"<td>{self._player(f'/jobs/{quote(job_id)}/lines/{n}/audio', 'original')}</td>"
                f"<td>{take}</td></tr>")
        scene = (f'<p>The re-voiced scene: {self._player(file_url(job_id, REVOICED_FILE), "scene")}</p>'
                 if has_scene else "")
        replaced, selected = int(report.get("replaced") or 0), len(report.get("lines") or [])
        return (f"<h2>Re-voiced {replaced} of {selected} line(s)</h2>"
                f"{scene}<table id=\"lines\"><thead><tr><th>line</th><th>time (s)</th><th>speaker</th>"
                f"<th>character</th><th>words</th><th>mean before → after</th>{head}<th>verdict</th>"
                f"<th>original</th><th>re-voiced</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")

    # -- JSON and the event stream --------------------------------------------------------------------
    async def api_pipelines(self, request: Request) -> Response:
        return JSONResponse({"pipelines": [
            {"name": p.name, "description": p.description, "params": sorted(p.params),
             "stages": [{"name": s.name, "service": s.service, "depends_on": list(s.depends_on)}
                        for s in p.stages]}
            for p in self.engine.pipelines.values()]})

    async def api_jobs(self, request: Request) -> Response:
        listed = self._list(request)
        return JSONResponse({"jobs": [job_summary(j) for j in listed.jobs],
                             "next_page_token": listed.next_page_token})

    async def api_job(self, request: Request) -> Response:
        job = self._job(request)
        return JSONResponse(job_summary(job) | {"params": json_format.MessageToDict(job.params),
                                                "result": json_format.MessageToDict(job.result)})

    async def api_events(self, request: Request) -> Response:
        """The job's events as server-sent events (``event: job``), from ``?after=N`` or the browser's
        ``Last-Event-ID`` on a reconnect; ``event: end`` once the job is final and every event was sent."""
        job = self._job(request)  # an unknown job is a 404 here, before the stream starts
        after = 0
        for value in (request.query_params.get("after"), request.headers.get("last-event-id")):
            if value:
                if not value.isdigit():
                    raise invalid_argument("after", "an event sequence number")
                after = max(after, int(value))
        return StreamingResponse(self._event_stream(job.job_id, after), media_type="text/event-stream",
                                 headers={"x-accel-buffering": "no"})

    async def _event_stream(self, job_id: str, after: int) -> AsyncIterator[str]:
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue(maxsize=256)

        async def pump() -> None:
            try:
                async for event in self.engine.watch(job_id, after):
                    await queue.put(("job", event))
                await queue.put(("end", None))
            except ServiceError as exc:
                await queue.put(("failure", exc.message))
            except Exception as exc:  # the store failed: tell the page rather than hang it
                log.exception("console: watching job %s failed", job_id)
                await queue.put(("failure", f"{type(exc).__name__}: {exc}"))

        pumping = asyncio.create_task(pump(), name=f"console-watch-{job_id}")
        closing = asyncio.create_task(self.closing.wait())
        try:
            yield "retry: 2000\n\n"
            while True:
                getting = asyncio.create_task(queue.get())
                done, _ = await asyncio.wait({getting, closing}, timeout=HEARTBEAT_SECONDS,
                                             return_when=asyncio.FIRST_COMPLETED)
                if getting not in done:
                    getting.cancel()
                    if closing in done:
                        return  # the gateway stops: the browser reconnects with Last-Event-ID later
                    yield ": keep-alive\n\n"
                    continue
                kind, item = getting.result()
                if kind == "job":
                    payload = {"sequence": item.sequence, "kind": S.JobEventKind.Name(item.kind),
                               "stage": item.stage, "message": item.message, "time": _time(item.time),
                               "job": job_summary(item.job)}
                    data = json.dumps(payload, ensure_ascii=False)
                    yield f"id: {item.sequence}\nevent: job\ndata: {data}\n\n"
                    continue
                data = json.dumps({"error": item} if kind == "failure" else {})
                yield f"event: {kind}\ndata: {data}\n\n"
                return
        finally:
            pumping.cancel()
            closing.cancel()
            await asyncio.gather(pumping, closing, return_exceptions=True)

    async def aclose(self) -> None:
        """End the event streams."""
        self.closing.set()


# ============================================================================================ the server


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handling: the gateway owns SIGTERM/SIGINT (drain, then stop)."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[override]
        yield


class ConsoleServer:
    """The console over HTTP(S), run by uvicorn as a task on the current (the gateway's) event loop.

    The socket is bound here, not by uvicorn, so a port in use is an error of :meth:`start` (uvicorn
    would exit the process) and port 0 is resolved before anything is logged.
    """

    def __init__(self, console: Console, host: str, port: int, *, tls_cert_file: str | None = None,
                 tls_key_file: str | None = None) -> None:
        self.console = console
        self.host = host
        self.port = port
        self.tls = bool(tls_cert_file and tls_key_file)
        self._config = uvicorn.Config(
            console.app, lifespan="off", log_config=None, access_log=False, loop="none", ws="none",
            http="h11", proxy_headers=False, server_header=False,
            timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS,
            ssl_certfile=tls_cert_file if self.tls else None, ssl_keyfile=tls_key_file if self.tls else None)
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}/"

    async def start(self) -> None:
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
            sock = socket.socket(family, kind, proto)
        except OSError as exc:
            raise RuntimeError(f"the web console cannot listen on {self.host}:{self.port}: {exc}") from exc
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
        except OSError as exc:
            sock.close()
            raise RuntimeError(f"the web console cannot listen on {self.host}:{self.port} "
                               f"(console_port): {exc.strerror or exc}") from exc
        self.port = sock.getsockname()[1]
        self._server = _EmbeddedServer(self._config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="web-console")
        while not self._server.started and not self._task.done():
            await asyncio.sleep(0.01)
        if self._task.done():
            sock.close()
            error = self._task.exception() if not self._task.cancelled() else None
            raise RuntimeError(f"the web console did not start: {error!r}") from error

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        await self.console.aclose()
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), SHUTDOWN_GRACE_SECONDS + 5)
        except TimeoutError:
            log.warning("the web console did not stop in time; cancelling it")
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._server = None
