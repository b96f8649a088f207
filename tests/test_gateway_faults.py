"""Faults the gateway must ride out: a model service killed with SIGKILL in the middle of a stage and
started again on its address — the job finishes, its stage result recorded once, its events in order.

The evaluator runs as its own process (``dramaturg serve evaluator``), as it does under compose or
Kubernetes, which restart it; the test restarts it. The stage fans out many Evaluate requests, so the
kill lands while some are answered and others are in flight.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from dramaturg.common.v1 import common_pb2
from dramaturg.evaluator.v1 import evaluator_pb2, evaluator_pb2_grpc
from dramaturg.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from dramaturg.services.gateway.pipelines import PipelineSpec, StageSpec, fan_out
from dramaturg.shared.cli.stack import free_port
from dramaturg.shared.grpc.client import wait_for_serving
from google.protobuf import json_format
from helpers import ServerThread
from hostile import speechlike, wav
from test_evaluator_server import CONTEXT, publish_tiny
from test_gateway import AUTH, gateway, wait_done, wav_input

LINES = 48


def serve_evaluator(home: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "DRAMATURG_HOME": str(home), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "dramaturg.shared.cli.main", "serve", "evaluator", "--port", str(port),
           "--metrics-port", "0"]
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    assert wait_for_serving(f"127.0.0.1:{port}", timeout=120), log.read_text()[-2000:]
    return proc


def test_a_service_killed_mid_stage_and_restarted_loses_nothing(dramaturg_home: Path, tmp_path: Path) -> None:
    publish_tiny(dramaturg_home)
    audio = common_pb2.AudioInput(content=wav(speechlike(1.0, seed=4)))

    async def score_lines(ctx):
        stub = evaluator_pb2_grpc.EvaluatorStub(ctx.channel("evaluator"))
        request = evaluator_pb2.EvaluateRequest(audio=audio, rubric=evaluator_pb2.REALISM, context=CONTEXT)
        replies = await fan_out(ctx, list(range(LINES)), lambda _: stub.Evaluate(request, timeout=60),
                                "scored line")
        return {"scores": [round(r.mean_score, 5) for r in replies]}

    spec = PipelineSpec(name="lines", description="many Evaluate requests",
                        stages=(StageSpec("score", score_lines, service="evaluator", max_attempts=1),),
                        result=lambda outputs: outputs["score"])
    port, log = free_port(), tmp_path / "evaluator.log"
    proc = serve_evaluator(dramaturg_home, port, log)
    try:
        gw = gateway(dramaturg_home, {"lines": spec}, services={"evaluator": f"127.0.0.1:{port}"})
        with ServerThread(gw) as srv, grpc.insecure_channel(srv.target) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            job = stub.SubmitJob(gateway_pb2.SubmitJobRequest(pipeline="lines", audio=wav_input()),
                                 metadata=AUTH, timeout=10)
            deadline = time.monotonic() + 60
            while True:  # kill it once some lines are scored and the rest are not
                current = stub.GetJob(gateway_pb2.GetJobRequest(job_id=job.job_id), metadata=AUTH, timeout=5)
                if 0 < current.stages[0].progress < 0.5:
                    break
                assert current.stages[0].progress < 0.5, "the stage ran too fast to be interrupted"
                assert time.monotonic() < deadline
                time.sleep(0.01)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
            killed_at = current.stages[0].progress
            proc = serve_evaluator(dramaturg_home, port, log)  # what compose / Kubernetes would do
            final = wait_done(stub, job.job_id, timeout=180)
            events = list(stub.WatchJob(gateway_pb2.WatchJobRequest(job_id=job.job_id), metadata=AUTH,
                                        timeout=10))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    assert final.state == gateway_pb2.SUCCEEDED, final.error
    assert 0 < killed_at < 0.5
    scores = json_format.MessageToDict(final.result)["scores"]
    assert len(scores) == LINES and len(set(scores)) == 1  # every line answered, by the same model
    sequences = [e.sequence for e in events]
    assert sequences == sorted(set(sequences))  # every event once, in order
    succeeded = [e for e in events if e.kind == gateway_pb2.STAGE_STATE_CHANGED and e.message == "succeeded"]
    assert len(succeeded) == 1  # the stage's result recorded once
    assert any("UNAVAILABLE" in e.message for e in events if e.kind == gateway_pb2.LOG)
