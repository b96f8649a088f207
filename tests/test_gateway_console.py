"""The gateway's web console (services/gateway/console.py): the token guards every page, stream and
file; engine errors reach the browser with their message and HTTP status; the event stream replays
and follows a job; job files stream with ranges; a scene report (an analyze_scene-shaped report.json,
and a revoice_scene one) renders with one row per line and plays each line's original and re-voiced
audio — and, end to end in Debian's chromium driven by Playwright: sign in, submit a scene, watch it
finish live, open the report, play a line.

The pipelines are analyze_scene's and revoice_scene's shapes with fake model stages (the real decode
stage, the real result builders and report writers), so the console sees real reports in seconds.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile as sf
from conftest import tone_wav
from dramaturg.common.v1 import common_pb2
from dramaturg.gateway.v1 import gateway_pb2
from dramaturg.services.gateway.catalog import PIPELINES
from dramaturg.services.gateway.config import GatewaySettings
from dramaturg.services.gateway.console import (
    COOKIE,
    Console,
    ConsoleAuth,
    crop_wav,
    http_status,
    parse_wav_header,
    safe_next,
)
from dramaturg.services.gateway.engine import INPUT_FILE, SCENE_AUDIO_FILE
from dramaturg.services.gateway.pipelines import (
    SAMPLE_RATE,
    PipelineSpec,
    StageSpec,
    _encode_pcm16,
    _scene_result,
    decode_stage,
)
from dramaturg.services.gateway.reports import write_scene_report
from dramaturg.services.gateway.revoice import TAKES_DIR, write_revoice_report
from dramaturg.services.gateway.server import GatewayService
from dramaturg.shared.grpc import errors
from helpers import ServerThread, wait_for
from starlette.testclient import TestClient

TOKEN = "console-test-token"
BEARER = {"authorization": f"Bearer {TOKEN}"}
HOSTILE = "<script>alert('x')</script> & more"
# (start, end, diarized speaker, character, words, pitch_variation, emotional_expression)
LINES = [
    (0.0, 0.6, "SPK_0", "captain", "Hold the line.", 4.5, 4.0),
    (1.0, 1.6, "SPK_1", "", HOSTILE, 1.5, 2.0),
    (2.0, 2.6, "SPK_0", "captain", "Fire!", 3.0, 3.5),
]
SCENE = tone_wav(seconds=3.0)  # the tone sounds for the first 0.6 s of every second: the lines above
HOLD = threading.Event()  # a job with params {"hold": true} waits in its score stage until this is set
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--autoplay-policy=no-user-gesture-required",
]


# ---------------------------------------------------------------------------------------- pipelines


async def fake_diarize(ctx) -> dict[str, Any]:
    turns = [{"start": a, "end": b, "speaker": who, "confidence": 1.0} for a, b, who, *_ in LINES]
    await ctx.report(1.0, "2 speakers")
    return {"turns": turns, "exclusive_turns": turns, "rttm": "", "speakers": ["SPK_0", "SPK_1"],
            "model": "fake-diarization:v1"}


async def fake_identify(ctx) -> dict[str, Any]:
    script = [{"start": a, "end": b, "speaker": who, "confidence": 1.0, "voice_id": voice,
               "turn_voice_id": voice, "score": 0.9 if voice else 0.1} for a, b, who, voice, *_ in LINES]
    return {"speaker_names": {"SPK_0": "captain"}, "script": script}


async def fake_transcribe(ctx) -> dict[str, Any]:
    return {"lines": [{"start": a, "end": b, "text": text, "finish_reason": "stop"}
                      for a, b, _, _, text, *_ in LINES], "model": "fake-audiollm:v1"}


async def fake_score(ctx) -> dict[str, Any]:
    for i in range(len(LINES)):
        await ctx.report((i + 1) / (len(LINES) + 1), f"scored piece {i + 1}/{len(LINES)}")
        await asyncio.sleep(0.05)
    while ctx.params.get("hold") and not HOLD.is_set():
        await asyncio.sleep(0.02)
    lines = [{"start": a, "end": b, "mean_score": (p + e) / 2,
              "scores": {"pitch_variation": p, "emotional_expression": e}, "digit_mass": 0.9, "pieces": 1}
             for a, b, _, _, _, p, e in LINES]
    return {"lines": lines, "model": "fake-evaluator:v1"}


ANALYZE = PipelineSpec(
    name="analyze_scene",
    description="analyze_scene's stages and report, with fake model services (tests)",
    stages=(
        StageSpec("decode", decode_stage),
        StageSpec("diarize", fake_diarize, depends_on=("decode",)),
        StageSpec("identify", fake_identify, depends_on=("decode", "diarize")),
        StageSpec("transcribe", fake_transcribe, depends_on=("identify",)),
        StageSpec("score", fake_score, depends_on=("identify",)),
    ),
    result=_scene_result,
    report=write_scene_report,
    params={"hold": bool},
)

NEW_TAKE_HZ = 880.0


async def fake_splice(ctx) -> dict[str, Any]:
    """Line 0 replaced by an 880 Hz take in revoice/revoiced.wav; line 1 kept; line 2 passed over."""
    scene = (await ctx.audio.samples()).samples.copy()
    a, b = round(LINES[0][0] * SAMPLE_RATE), round(LINES[0][1] * SAMPLE_RATE)
    scene[a:b] = 0.25 * np.sin(2 * np.pi * NEW_TAKE_HZ * np.arange(b - a) / SAMPLE_RATE)
    (ctx.work_dir / TAKES_DIR).mkdir(parents=True, exist_ok=True)
    (ctx.work_dir / TAKES_DIR / "revoiced.wav").write_bytes(_encode_pcm16(scene, SAMPLE_RATE))

    def take(k: int, score: float, wer: float) -> dict[str, Any]:
        return {"line": 0, "take": k, "file": f"{TAKES_DIR}/t{k}.wav", "seed": k + 1, "seconds": 0.6,
                "model": "fake-tts:v1", "mean_score": score, "scores": {"pitch_variation": score},
                "transcript": "hold the line", "wer": wer, "similarity": 0.8, "same_speaker": True,
                "threshold": 0.5}

    def line(index: int) -> dict[str, Any]:
        start, end, who, voice, text, p, _ = LINES[index]
        return {"index": index, "start": start, "end": end, "speaker": who, "voice_id": voice, "text": text,
                "text_source": "script", "before": {"mean_score": p, "scores": {"pitch_variation": p}}}

    replaced = line(0) | {"takes": [take(0, 3.9, 0.0), take(1, 4.6, 0.0)], "chosen": 1,
                          "after": {"mean_score": 4.6, "scores": {"pitch_variation": 4.6}},
                          "loudness": {"method": "EBU R128", "gain_db": 1.5}, "fit": "padded 0.02 s"}
    kept = line(1) | {"takes": [take(0, 2.0, 0.9)], "chosen": None,
                      "reason": "no take passed the guards: 1 of 1 over WER 0.5"}
    passed = line(2) | {"reason": "no words for it"}
    return {"lines": [replaced, kept], "passed_over": [passed], "replaced": 1,
            "revoiced_file": f"{TAKES_DIR}/revoiced.wav"}


REVOICE = PipelineSpec(
    name="revoice_scene",
    description="revoice_scene's report, with a fake splice (tests)",
    stages=(StageSpec("decode", decode_stage), StageSpec("splice", fake_splice, depends_on=("decode",))),
    result=lambda outputs: {"duration_seconds": outputs["decode"]["duration_seconds"], "skipped_stages": {},
                            **outputs["splice"]},
    report=write_revoice_report,
)
TEST_PIPELINES = {"analyze_scene": ANALYZE, "revoice_scene": REVOICE, "probe": PIPELINES["probe"]}


# ------------------------------------------------------------------------------------------ fixtures


@dataclass
class RunningConsole:
    service: GatewayService
    server: ServerThread
    url: str

    def client(self, **headers: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=headers, follow_redirects=False, timeout=30)


@pytest.fixture(scope="module")
def console(tmp_path_factory) -> Iterator[RunningConsole]:
    """One gateway with its console on a free port for the module (each start costs seconds)."""
    home = tmp_path_factory.mktemp("console-home")
    settings = GatewaySettings(api_token=TOKEN, console_port=0, retry_base_seconds=0.05)
    service = GatewayService(settings, home=home, pipelines=TEST_PIPELINES)
    with ServerThread(service) as server:
        assert service.console_url is not None
        yield RunningConsole(service, server, service.console_url.rstrip("/"))
    HOLD.set()


def submit(client: httpx.Client, pipeline: str, audio: bytes = SCENE, params: dict | None = None) -> str:
    response = client.post("/submit", files={"audio": ("scene.wav", audio, "audio/wav")},
                           data={"pipeline": pipeline, "params": json.dumps(params) if params else ""})
    assert response.status_code == 303, response.text
    return response.headers["location"].rsplit("/", 1)[-1]


def wait_done(client: httpx.Client, job_id: str, timeout: float = 60) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def done() -> bool:
        found.update(client.get(f"/api/jobs/{job_id}").json())
        return found["terminal"]

    wait_for(done, timeout, f"job {job_id} to finish", interval=0.1)
    return found


@pytest.fixture(scope="module")
def scene_job(console: RunningConsole) -> str:
    """A finished analyze_scene job submitted through the console."""
    with console.client(**BEARER) as client:
        job_id = submit(client, "analyze_scene")
        job = wait_done(client, job_id)
    assert job["state"] == "SUCCEEDED", job["error"]
    return job_id


def read_wav(data: bytes) -> np.ndarray:
    samples, rate = sf.read(io.BytesIO(data), dtype="float32")
    assert rate == SAMPLE_RATE
    return samples


def span(samples: np.ndarray, start: float, end: float) -> np.ndarray:
    return samples[round(start * SAMPLE_RATE):round(end * SAMPLE_RATE)]


# --------------------------------------------------------------------------------------------- auth


def test_no_page_stream_or_file_is_reachable_without_the_token(console: RunningConsole,
                                                               scene_job: str) -> None:
    pages = ["/", "/submit", f"/jobs/{scene_job}", f"/jobs/{scene_job}/report", "/?state=RUNNING"]
    others = [f"/api/jobs/{scene_job}/events", f"/jobs/{scene_job}/files/report.json",
              f"/jobs/{scene_job}/files/timeline.png", f"/jobs/{scene_job}/lines/0/audio",
              f"/api/jobs/{scene_job}", "/api/jobs", "/api/pipelines", "/static/console.js", "/nowhere",
              f"/jobs/{scene_job}/files/../../../etc/passwd"]
    forged = ConsoleAuth("another-token", 3600).new_session()
    expired = ConsoleAuth(TOKEN, 3600).new_session(now=time.time() - 13 * 3600)  # the gateway: 12 h
    denied = [{}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {TOKEN}"},
              {"cookie": f"{COOKIE}={forged}"}, {"cookie": f"{COOKIE}={expired}"},
              {"cookie": f"{COOKIE}={TOKEN}"}, {"cookie": f"{COOKIE}=1.abc"}]
    for headers in denied:
        with console.client(**headers) as client:
            for path in pages:
                response = client.get(path)
                assert response.status_code == 303, (path, headers)
                assert response.headers["location"].startswith("/signin?next=")
            for path in others:
                response = client.get(path)
                assert response.status_code == 401, (path, headers, response.text)
                assert "sign in" in response.json()["error"]
                assert SCENE[:64] not in response.content
            # writes too: submitting, cancelling
            assert client.post("/submit", files={"audio": ("a.wav", SCENE)}, data={"pipeline": "probe"}
                               ).status_code == 401
            assert client.post(f"/jobs/{scene_job}/cancel").status_code == 401
    with console.client() as client:  # what the sign-in page itself needs stays open
        assert client.get("/signin").status_code == 200
        assert client.get("/static/console.css").status_code == 200
        assert client.get("/api/jobs").headers["www-authenticate"].startswith("Bearer")
    with console.client(**BEARER) as client:
        for path in pages + others[:-2]:
            assert client.get(path).status_code == 200, path
    with console.client() as client:  # the session cookie the sign-in sets opens the same
        assert client.post("/signin", data={"token": TOKEN}).status_code == 303
        for path in pages + others[:-2]:
            assert client.get(path).status_code == 200, path


def test_sign_in_sets_a_strict_http_only_session_and_sign_out_ends_it(console: RunningConsole) -> None:
    with console.client() as client:
        wrong = client.post("/signin", data={"token": "nope", "next": "/submit"})
        assert wrong.status_code == 401 and "not this gateway" in wrong.text and COOKIE not in wrong.cookies
        right = client.post("/signin", data={"token": TOKEN, "next": "/submit?pipeline=probe"})
        assert right.status_code == 303 and right.headers["location"] == "/submit?pipeline=probe"
        cookie = right.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
        assert TOKEN not in cookie  # an HMAC of the token, not the token
        assert client.get("/").status_code == 200
        assert client.get("/signin?next=/jobs").headers["location"] == "/jobs"  # signed in: straight on
        out = client.post("/signout")
        assert out.status_code == 303 and client.get("/").status_code == 303
        for evil in ("//evil.example/", "https://evil.example/", "/\\evil.example"):  # no open redirect
            response = client.post("/signin", data={"token": TOKEN, "next": evil})
            assert response.headers["location"] == "/"
    with console.client(**BEARER, origin="https://evil.example") as client:  # a cross-site write
        response = client.post("/submit", files={"audio": ("a.wav", SCENE)}, data={"pipeline": "probe"})
        assert response.status_code == 403
    with console.client(**BEARER) as client:
        page = client.get("/")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert page.headers["cache-control"] == "no-store" and page.headers["x-frame-options"] == "DENY"


def test_the_session_value_is_signed_and_expires() -> None:
    auth = ConsoleAuth(TOKEN, session_seconds=60)
    value = auth.new_session(now=1_000_000)
    assert auth.valid_session(value, now=1_000_030) and not auth.valid_session(value, now=1_000_061)
    issued, signature = value.split(".")
    assert not auth.valid_session(f"{int(issued) + 1}.{signature}", now=1_000_030)  # a moved issue time
    assert not ConsoleAuth("rotated", 60).valid_session(value, now=1_000_030)  # a new token ends it
    assert safe_next("/jobs/x?y=1") == "/jobs/x?y=1" and safe_next("//x") == "/" and safe_next(None) == "/"


# ------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("error", "status"), [
    (errors.invalid_argument("pipeline", "unknown pipeline"), 400),
    (errors.not_found("job", "x"), 404),
    (errors.failed_precondition("job x already finished"), 409),
    (errors.resource_exhausted("64 jobs are already waiting", retry_after_seconds=5), 429),
    (errors.unavailable("the store is down"), 503),
])
def test_engine_errors_reach_the_browser_with_their_status_and_message(error, status) -> None:
    class FailingEngine:
        pipelines = TEST_PIPELINES

        def get(self, job_id: str):
            raise error

        async def submit(self, request):
            raise error

    assert http_status(error.code) == status
    app = Console(FailingEngine(), TOKEN).app  # type: ignore[arg-type]
    with TestClient(app, base_url="http://testserver", headers=BEARER, follow_redirects=False) as client:
        api = client.get("/api/jobs/abc")
        assert api.status_code == status and api.json()["error"] == error.message
        assert api.json()["code"] == error.code.name
        page = client.get("/jobs/abc")
        assert page.status_code == status and page.headers["content-type"].startswith("text/html")
        assert error.message.split("'")[0] in page.text
        form = client.post("/submit", files={"audio": ("a.wav", SCENE)}, data={"pipeline": "probe"})
        assert form.status_code == status and 'id="error"' in form.text
        if status == 429:
            assert api.headers["retry-after"] == "5" and form.status_code == 429


def test_an_upload_over_the_gateway_s_message_limit_is_refused_before_it_is_read() -> None:
    class Engine:
        pipelines = TEST_PIPELINES

        async def submit(self, request):  # pragma: no cover - never reached
            raise AssertionError("an oversized upload reached the engine")

    app = Console(Engine(), TOKEN, max_upload_bytes=4096).app  # type: ignore[arg-type]
    with TestClient(app, headers=BEARER, follow_redirects=False) as client:
        response = client.post("/submit", files={"audio": ("big.wav", bytes(3 * 1024 * 1024))},
                               data={"pipeline": "probe"})
        assert response.status_code == 413 and "larger than this gateway accepts" in response.text

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted while it streams
            yield b"--b\r\nContent-Disposition: form-data; name=\"audio\"; filename=\"a.wav\"\r\n\r\n"
            for _ in range(40):
                yield bytes(64 * 1024)

        streamed = client.post("/submit", content=chunks(),
                               headers={"content-type": "multipart/form-data; boundary=b"})
        assert streamed.status_code == 413 and "larger than this gateway accepts" in streamed.text


def test_the_real_engine_s_refusals_keep_their_message(console: RunningConsole, scene_job: str) -> None:
    with console.client(**BEARER) as client:
        def post(**data: str) -> httpx.Response:
            return client.post("/submit", files={"audio": ("a.wav", data.pop("audio", SCENE))}, data=data)

        cases = [
            (post(pipeline="nope"), 400, "unknown pipeline"),
            (post(pipeline="probe", params="{\"bogus\": 1}"), 400, "bogus"),
            (post(pipeline="probe", params="[1, 2]"), 400, "a JSON object"),
            (post(pipeline="probe", params="{oops"), 400, "not JSON"),
            (post(pipeline="probe", audio=b"not audio at all"), 400, "audio"),
            (client.post("/submit", data={"pipeline": "probe"}), 400, "Choose a scene file"),
        ]
        for response, status, words in cases:
            assert response.status_code == status and words in response.text, response.text
            assert 'id="error"' in response.text and "<form" in response.text  # the form again, to fix
        finished = client.post(f"/jobs/{scene_job}/cancel")
        assert finished.status_code == 409 and "already finished" in finished.text
        assert client.get("/api/jobs/nope").status_code == 404
        assert client.get(f"/jobs/{scene_job}/files/missing.txt").status_code == 404
        assert client.get(f"/jobs/{scene_job}/lines/99/audio").status_code == 404
        assert client.get("/api/jobs?state=BOGUS").status_code == 400


# --------------------------------------------------------------------------------- streams and files


def sse(text: str) -> list[dict[str, str]]:
    events = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and line[0] != ":")
        if "event" in fields:
            events.append(fields)
    return events


def test_the_event_stream_replays_a_job_and_resumes_after_an_event(console: RunningConsole,
                                                                   scene_job: str) -> None:
    with console.client(**BEARER) as client:
        response = client.get(f"/api/jobs/{scene_job}/events")
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse(response.text)
        jobs = [e for e in events if e["event"] == "job"]
        assert events[-1]["event"] == "end" and len(jobs) >= 10
        assert [int(e["id"]) for e in jobs] == list(range(1, len(jobs) + 1))
        last = json.loads(jobs[-1]["data"])
        assert last["job"]["state"] == "SUCCEEDED" and last["job"]["report_url"].endswith("/report")
        kinds = {json.loads(e["data"])["kind"] for e in jobs}
        assert {"JOB_STATE_CHANGED", "STAGE_STATE_CHANGED", "STAGE_PROGRESS"} <= kinds
        resumed = client.get(f"/api/jobs/{scene_job}/events", headers={"last-event-id": str(len(jobs) - 2)})
        tail = sse(resumed.text)
        assert [e.get("id") for e in tail] == [str(len(jobs) - 1), str(len(jobs)), None]
        assert client.get(f"/api/jobs/{scene_job}/events?after=x").status_code == 400


def test_job_files_stream_whole_and_by_range(console: RunningConsole, scene_job: str) -> None:
    folder = console.service.engine.work_root / scene_job / "files"
    report = (folder / "report.json").read_bytes()
    with console.client(**BEARER) as client:
        whole = client.get(f"/jobs/{scene_job}/files/report.json")
        assert whole.content == report and whole.headers["content-type"] == "application/json"
        assert "default-src 'none'" in whole.headers["content-security-policy"]
        part = client.get(f"/jobs/{scene_job}/files/report.json", headers={"range": "bytes=10-29"})
        assert part.status_code == 206 and part.content == report[10:30]
        assert part.headers["content-range"] == f"bytes 10-29/{len(report)}"
        suffix = client.get(f"/jobs/{scene_job}/files/report.json", headers={"range": "bytes=-7"})
        assert suffix.status_code == 206 and suffix.content == report[-7:]
        assert client.get(f"/jobs/{scene_job}/files/report.json",
                          headers={"range": f"bytes={len(report)}-"}).status_code == 416
        png = client.get(f"/jobs/{scene_job}/files/timeline.png?download=1")
        assert png.content[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.headers["content-disposition"].startswith("attachment")
        html = client.get(f"/jobs/{scene_job}/files/script.html")
        assert "<script>alert" not in html.text  # the report writer escaped it; the CSP would block it too


# ------------------------------------------------------------------------------------------ reports


def test_a_scene_report_shows_every_line_with_scores_and_plays_its_original_audio(
        console: RunningConsole, scene_job: str) -> None:
    with console.client(**BEARER) as client:
        page = client.get(f"/jobs/{scene_job}/report")
        assert page.status_code == 200
        rows = re.findall(r'<tr data-line="(\d+)">(.*?)</tr>', page.text, re.S)
        assert [int(n) for n, _ in rows] == [0, 1, 2]
        assert "<script>alert" not in page.text and "&lt;script&gt;alert(&#x27;x&#x27;)" in rows[1][1]
        assert "<th>emotional expression</th>" in page.text and "<th>pitch variation</th>" in page.text
        assert "4.50" in rows[0][1] and "captain" in rows[0][1] and "Hold the line." in rows[0][1]
        assert f'src="/jobs/{scene_job}/files/timeline.svg"' in page.text
        assert f'src="/jobs/{scene_job}/lines/1/audio"' in rows[1][1]
        original = read_wav(SCENE)
        for n, (start, end, *_) in enumerate(LINES):
            audio = client.get(f"/jobs/{scene_job}/lines/{n}/audio")
            assert audio.headers["content-type"] == "audio/wav"
            played = read_wav(audio.content)
            assert len(played) == round((end - start) * SAMPLE_RATE)
            np.testing.assert_allclose(played, span(original, start, end), atol=3 / 32768)
    # the engine deleted the job's blob when it ended; its link in the job's folder remains
    work = console.service.engine.work_root / scene_job
    stored = json.loads((work / INPUT_FILE).read_text())
    assert console.service.blobs.get(stored["blob"], stored["suffix"]) is None
    assert (work / SCENE_AUDIO_FILE).is_file()


def test_lines_of_a_job_submitted_over_grpc_play_after_it_ends(console: RunningConsole) -> None:
    request = gateway_pb2.SubmitJobRequest(
        pipeline="analyze_scene", audio=common_pb2.AudioInput(content=tone_wav(seconds=3.0, freq=330.0)))
    job = console.server.call(console.service.engine.submit(request))
    with console.client(**BEARER) as client:
        assert wait_done(client, job.job_id)["state"] == "SUCCEEDED"
        assert client.get(f"/jobs/{job.job_id}/lines/0/audio").status_code == 200  # the blob is gone
        work = console.service.engine.work_root / job.job_id
        (work / SCENE_AUDIO_FILE).unlink()  # as on a volume where no hard link can be made
        kept = client.get(f"/jobs/{job.job_id}/lines/0/audio")
        assert kept.status_code == 404 and "deletes a job's decoded input" in kept.json()["error"]
        assert client.get(f"/jobs/{job.job_id}/report").status_code == 200  # the report itself is there
        probe = submit(client, "probe")
        assert wait_done(client, probe)["state"] == "SUCCEEDED"
        no_report = client.get(f"/jobs/{probe}/report")
        assert no_report.status_code == 404 and "analyze_scene and revoice_scene" in no_report.text


def test_a_revoice_report_plays_the_original_and_the_re_voiced_take(console: RunningConsole) -> None:
    with console.client(**BEARER) as client:
        job_id = submit(client, "revoice_scene")
        assert wait_done(client, job_id)["state"] == "SUCCEEDED"
        page = client.get(f"/jobs/{job_id}/report")
        assert page.status_code == 200 and "Re-voiced 1 of 2 line(s)" in page.text
        rows = dict(re.findall(r'<tr data-line="(\d+)">(.*?)</tr>', page.text, re.S))
        assert sorted(rows) == ["0", "1", "2"]
        assert "take 1" in rows["0"] and "<b>4.50</b> → <b>4.60</b>" in rows["0"]
        assert f'src="/jobs/{job_id}/lines/0/revoiced"' in rows["0"]
        assert "kept the original" in rows["1"] and "/revoiced" not in rows["1"]
        assert "passed over: no words for it" in rows["2"]
        assert f'src="/jobs/{job_id}/files/revoiced.wav"' in page.text
        start, end = LINES[0][:2]
        take = read_wav(client.get(f"/jobs/{job_id}/lines/0/revoiced").content)
        scene = read_wav((console.service.engine.work_root / job_id / "files" / "revoiced.wav").read_bytes())
        np.testing.assert_array_equal(take, span(scene, start, end))
        spectrum = np.abs(np.fft.rfft(take))
        peak = np.fft.rfftfreq(len(take), 1 / SAMPLE_RATE)[spectrum.argmax()]
        assert peak == pytest.approx(NEW_TAKE_HZ, abs=5)
        original = read_wav(client.get(f"/jobs/{job_id}/lines/0/audio").content)
        np.testing.assert_allclose(original, span(read_wav(SCENE), start, end), atol=3 / 32768)
        assert client.get(f"/jobs/{job_id}/lines/1/revoiced").status_code == 404  # kept its original


def test_wav_crops_keep_the_format_and_refuse_what_is_not_pcm() -> None:
    stereo = np.stack([np.linspace(-0.5, 0.5, 8000), np.linspace(0.5, -0.5, 8000)], axis=1).astype(np.float32)
    buffer = io.BytesIO()
    sf.write(buffer, stereo, 8000, format="WAV", subtype="FLOAT")
    data = buffer.getvalue()

    async def read(offset: int, length: int) -> bytes:
        return data[offset:offset + length]

    cropped, rate = sf.read(io.BytesIO(asyncio.run(crop_wav(read, len(data), 0.25, 0.5))), dtype="float32")
    assert rate == 8000 and cropped.shape == (2000, 2)
    np.testing.assert_array_equal(cropped, stereo[2000:4000])
    assert parse_wav_header(data, len(data)).channels == 2
    with pytest.raises(ValueError, match="not a WAV"):
        parse_wav_header(b"OggS" + bytes(40), 44)
    with pytest.raises(errors.ServiceError) as outside:
        asyncio.run(crop_wav(read, len(data), 5.0, 6.0))
    assert "outside the audio" in outside.value.message


def test_the_console_is_off_by_default_and_stops_with_the_gateway(tmp_path: Path) -> None:
    off = GatewayService(GatewaySettings(api_token=TOKEN), home=tmp_path / "off")
    with ServerThread(off):
        assert off.console_url is None
    service = GatewayService(GatewaySettings(api_token=TOKEN, console_port=0), home=tmp_path / "on",
                             pipelines=TEST_PIPELINES)
    streamed: list[str] = []
    HOLD.clear()
    try:
        with ServerThread(service):
            url = service.console_url
            assert url is not None and url.startswith("http://127.0.0.1:")
            port = int(url.rstrip("/").rsplit(":", 1)[1])
            with httpx.Client(base_url=url, headers=BEARER) as client:
                job_id = submit(client, "analyze_scene", params={"hold": True})

            def watch() -> None:  # a browser watching a running job while the gateway stops
                with httpx.stream("GET", f"{url}api/jobs/{job_id}/events", headers=BEARER,
                                  timeout=30) as events:
                    for line in events.iter_lines():
                        streamed.append(line)

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            wait_for(lambda: any(line.startswith("id: ") for line in streamed), 10, "the first event")
            stopping = time.monotonic()
        watcher.join(10)
        # the stream ended with the gateway, at once and without an "end": the job is not finished
        assert not watcher.is_alive() and time.monotonic() - stopping < 4
        assert "event: end" not in streamed
    finally:
        HOLD.set()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        taken = GatewayService(GatewaySettings(api_token=TOKEN, console_port=busy.getsockname()[1]),
                               home=tmp_path / "busy")
        with pytest.raises(RuntimeError, match="cannot listen"), ServerThread(taken):
            pass
    finally:
        busy.close()


# ----------------------------------------------------------------------------- a real browser, end to end

PLAY = """async (selector) => {
  const audio = document.querySelector(selector);
  let playing = false;
  audio.addEventListener("playing", () => { playing = true; }, { once: true });
  const ended = new Promise((resolve) => {
    audio.addEventListener("ended", () => resolve(true), { once: true });
    setTimeout(() => resolve(false), 15000);
  });
  await audio.play();
  const finished = await ended;
  return { playing, ended: finished, currentTime: audio.currentTime, duration: audio.duration,
           error: audio.error ? audio.error.code : null };
}"""


@pytest.mark.skipif(not CHROMIUM.exists(),
                    reason=f"Debian's chromium is not installed at {CHROMIUM} (`make debs` installs it)")
def test_sign_in_submit_watch_it_finish_open_the_report_and_play_a_line(console: RunningConsole) -> None:
    from playwright.sync_api import expect, sync_playwright

    HOLD.clear()
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                                 args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.set_default_timeout(30_000)
                problems: list[str] = []  # script errors, and answers >= 400 but the wrong sign-in's
                page.on("pageerror", lambda error: problems.append(str(error)))
                page.on("response",
                        lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 400 else None)

                page.goto(console.url + "/")  # not signed in: the sign-in page, coming back here after
                expect(page).to_have_url(re.compile(r"/signin\?next=%2F$"))
                page.fill("input[name=token]", "not-the-token")
                page.click("button[type=submit]")
                expect(page.locator("#error")).to_contain_text("not this gateway's API token")
                assert problems == [f"401 {console.url}/signin"]
                problems.clear()
                page.fill("input[name=token]", TOKEN)
                page.click("button[type=submit]")
                expect(page.locator("h1")).to_have_text("Jobs")

                page.click("nav >> text=Submit a scene")
                page.set_input_files("input[name=audio]", files=[
                    {"name": "scene.wav", "mimeType": "audio/wav", "buffer": SCENE}])
                page.select_option("select[name=pipeline]", "analyze_scene")
                page.fill("textarea[name=params]", '{"hold": true}')
                page.click("form.card button[type=submit]")

                # the job page follows the job live: the score stage runs (held) ...
                expect(page).to_have_url(re.compile(r"/jobs/[0-9a-f]+$"))
                job = page.locator("#job")
                expect(job).to_have_attribute("data-watch", "live")
                expect(page.locator("#job-state")).to_have_text("RUNNING")
                expect(page.locator('tr[data-stage="score"] .stage-state .state')).to_have_text("RUNNING")
                expect(page.locator('tr[data-stage="diarize"] .stage-state .state')).to_have_text("SUCCEEDED")
                expect(page.locator("#report-link")).to_be_hidden()
                seen = page.locator("#events li").count()
                # ... and finishes on the same page, without a reload, once the stage may go on
                HOLD.set()
                expect(page.locator("#job-state")).to_have_text("SUCCEEDED", timeout=60_000)
                expect(job).to_have_attribute("data-watch", "finished")
                expect(page.locator('tr[data-stage="score"] .stage-state .state')).to_have_text("SUCCEEDED")
                expect(page.locator("#job-percent")).to_have_text("100%")
                assert page.locator("#events li").count() > seen
                expect(page.locator("#job-files li")).to_have_count(5)

                page.click("#report-link")
                expect(page).to_have_url(re.compile(r"/jobs/[0-9a-f]+/report$"))
                rows = page.locator("#lines tbody tr")
                expect(rows).to_have_count(len(LINES))
                expect(rows.nth(1)).to_contain_text(HOSTILE)  # shown as text, not run
                expect(rows.nth(0)).to_contain_text("4.50")
                page.wait_for_function("() => document.getElementById('timeline').naturalWidth > 0")

                played = page.evaluate(PLAY, 'tr[data-line="1"] audio[data-kind="original"]')
                assert played["error"] is None and played["playing"] and played["ended"], played
                assert played["duration"] == pytest.approx(LINES[1][1] - LINES[1][0], abs=0.01)
                assert played["currentTime"] > 0
                assert not problems, problems
            finally:
                browser.close()
    finally:
        HOLD.set()
