"""The CLI end to end: the embedded stack as real processes, a job through the gateway, and errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tone_wav
from dramaturg.shared import registry
from dramaturg.shared.cli.main import main
from dramaturg.shared.cli.stack import Stack, stack_file

CLI = [sys.executable, "-m", "dramaturg.shared.cli.main"]


def run_cli(*args: str, home: Path, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**__import__("os").environ, "DRAMATURG_HOME": str(home)}
    result = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def test_up_submit_watch_down(dramaturg_home: Path, tmp_path: Path) -> None:
    wav = tmp_path / "scene.wav"
    wav.write_bytes(tone_wav(seconds=2.0))
    run_cli("up", "--detach", "--port", "0", "--console-port", "0", home=dramaturg_home)
    try:
        stack = Stack.load(stack_file(dramaturg_home))
        assert "gateway" in [p.service for p in stack.processes]
        # the web console is up beside the gateway, behind the token
        import urllib.error
        import urllib.request

        assert stack.console.startswith("http://127.0.0.1:")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(stack.console + "api/jobs", timeout=10)
        assert refused.value.code == 401
        token_file = Path(stack.token_file)
        assert token_file.stat().st_mode & 0o777 == 0o600
        submitted = run_cli("job", "submit", str(wav), "--pipeline", "probe", "--watch", home=dramaturg_home)
        job = json.loads(submitted.stdout)
        assert job["state"] == "SUCCEEDED"
        assert job["result"]["duration_seconds"] == pytest.approx(2.0, abs=0.01)
        listed = run_cli("job", "list", home=dramaturg_home)
        assert job["job_id"] in listed.stdout
        bad = run_cli("job", "get", "nope", home=dramaturg_home, check=False)
        assert bad.returncode == 1 and "NOT_FOUND" in bad.stderr
        # without the token the gateway refuses
        env_home = tmp_path / "other-home"
        env_home.mkdir()
        denied = run_cli("job", "--gateway", stack.gateway, "list", home=env_home, check=False)
        assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr
    finally:
        run_cli("down", home=dramaturg_home)
    assert not stack_file(dramaturg_home).exists()


@pytest.mark.parametrize("service", sorted(set(registry.PLANNED) - set(registry.registered())))
def test_train_for_unbuilt_services_says_so(service: str, capsys) -> None:
    assert main(["train", service]) == 2
    assert "not built yet" in capsys.readouterr().err


@pytest.mark.parametrize("service", sorted(set(registry.PLANNED) - set(registry.registered())))
def test_serve_for_unbuilt_services_says_so(service: str, capsys) -> None:
    assert main(["serve", service]) == 2
    assert "not built yet" in capsys.readouterr().err


def test_demo_scores_the_job_rttm_against_the_generated_reference(tmp_path: Path) -> None:
    from dramaturg.shared.cli.demo import reference_annotation, score_rttm

    folder = tmp_path / "diarization"
    (folder / "rttm").mkdir(parents=True)
    (folder / "uem").mkdir()
    rttm = ("SPEAKER s 1 0.000 2.000 <NA> <NA> id1 <NA> <NA>\n"
            "SPEAKER s 1 2.000 2.000 <NA> <NA> id2 <NA> <NA>\n")
    (folder / "rttm" / "s.rttm").write_text(rttm)
    (folder / "uem" / "s.uem").write_text("s 1 0.000 4.000\n")
    reference, uem = reference_annotation(tmp_path, "s")
    # the same turns under other labels: a perfect diarization
    assert score_rttm(rttm.replace("id1", "A").replace("id2", "B"), reference, uem)["der"] == 0.0
    # one speaker for everything: half the speech is confused; a missing second: a quarter missed
    merged = "SPEAKER s 1 0.000 4.000 <NA> <NA> A <NA> <NA>\n"
    assert score_rttm(merged, reference, uem) == pytest.approx(
        {"der": 0.5, "confusion": 0.5, "false_alarm": 0.0, "miss": 0.0})
    short = "SPEAKER s 1 0.000 3.000 <NA> <NA> A <NA> <NA>\nSPEAKER s 1 3.000 0.0 <NA> <NA> B <NA> <NA>\n"
    assert score_rttm(short, reference, uem)["miss"] == pytest.approx(0.25)


def test_training_progress_is_one_bar_per_run_with_its_phase() -> None:
    """`dramaturg train` / a first `make demo`: one bar whose description says the phase, no line per
    checkpoint, epoch or trial (they stay in events.jsonl), but every WARNING and ERROR printed."""
    import io

    from dramaturg.shared.training.runner import _render
    from rich.console import Console
    from rich.progress import Progress, TextColumn

    out = io.StringIO()
    # a diarization-like run: 4 epochs of 10 batches, then 10 tuning trials on the same step axis
    events = [
        {"type": "state", "state": "RUNNING"},
        {"type": "log", "level": "INFO", "message": "tuning starts after 4 epochs"},
        {"type": "progress", "step": 5, "total_steps": 50, "epoch": 0.5},
        {"type": "metrics", "step": 10, "epoch": 1.0,
         "values": {"loss/train": 0.7, "DiarizationErrorRate": 0.5}},
        {"type": "log", "level": "INFO", "message": "epoch 1: loss/train 0.7000"},
        {"type": "checkpoint", "checkpoint": {"checkpoint_id": "step-00000010", "step": 10, "best": True}},
        {"type": "progress", "step": 23, "total_steps": 50, "epoch": 2.3},
    ]
    with Progress(TextColumn("{task.description}"), console=Console(file=out, width=120)) as progress:
        task = progress.add_task("diarization demo", total=None, metrics="", label="diarization",
                                 config={"epochs": 4})
        assert not any(_render(progress, task, "demo", event) for event in events)
        (shown,) = progress.tasks
        assert shown.description == "diarization training epoch 3/4"
        assert (shown.completed, shown.total) == (23, 40)
        assert "val DER 50.0%" in shown.fields["metrics"]
        for event in [
            {"type": "progress", "step": 43, "total_steps": 50, "epoch": 4.0},
            {"type": "metrics", "step": 43, "epoch": 4.0,
             "values": {"pipeline/der_dev_trial": 0.2, "pipeline/der_dev_best": 0.15}},
            {"type": "checkpoint", "checkpoint": {"checkpoint_id": "step-00000043", "step": 43}},
            {"type": "log", "level": "WARNING", "message": "pipeline tuning stopped"},
        ]:
            _render(progress, task, "demo", event)
        (shown,) = progress.tasks
        # a new phase restarts the bar, so the ETA is measured on the tuning's pace
        assert shown.description == "diarization tuning trial 3/10"
        assert (shown.completed, shown.total) == (3, 10)
        assert shown.fields["metrics"].startswith("best dev DER 15.0%")
        assert _render(progress, task, "demo", {"type": "state", "state": "SUCCEEDED"}) is True
    printed = out.getvalue()
    assert "tuning starts after 4 epochs" in printed and "[WARNING] pipeline tuning stopped" in printed
    assert "checkpoint" not in printed and "epoch 1:" not in printed and "state" not in printed


def test_train_prints_the_published_models_headline() -> None:
    from dramaturg.shared.cli.train import outcome

    assert outcome({"eer": 0.0412, "min_dcf": 0.31, "threshold": 0.4}) == "held-out EER 4.1 %, minDCF 0.310"
    assert outcome({"der_dev_after": 0.12, "der_test": 0.135}) == "dev DER 12.0 %, test DER 13.5 %"
    assert outcome({"loss/train": 1.0}) == ""


def test_a_published_part_never_becomes_the_default_model() -> None:
    from dramaturg.shared.cli.train import servable

    assert servable({}) and servable({"kind": "model"})
    assert not servable({"kind": "codec"}) and not servable({"kind": "lora-adapter"})


def test_the_stack_starts_a_service_only_for_a_servable_model(tmp_path: Path) -> None:
    """A published TTS codec alone is a part of a model: `dramaturg up` must not start tts on it."""
    from dramaturg.shared.cli.stack import has_model
    from dramaturg.shared.store import ModelStore

    store = ModelStore(tmp_path)
    assert not has_model(tmp_path, "tts")
    with store.create_version("tts", "codec", architecture="mimi", base_model="", recipe="codec",
                              labels={"kind": "codec"}) as folder:
        (folder / "config.json").write_text("{}")
    assert not has_model(tmp_path, "tts")
    with store.create_version("tts", "voice", architecture="csm", base_model="", recipe="full",
                              labels={"kind": "model"}) as folder:
        (folder / "config.json").write_text("{}")
    assert has_model(tmp_path, "tts")


def test_eval_dispatches_to_the_services_own_command(capsys) -> None:
    assert "evaluator" in [n for n, e in registry.registered().items() if e.evaluate]
    assert main(["eval", "no-such-service"]) == 2
    assert "has no evaluation command" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # the evaluator's own parser answers --help
        main(["eval", "evaluator", "--help"])
    assert exit_info.value.code == 0
    assert "--from-results" in capsys.readouterr().out


def test_the_stack_gateway_config_enables_the_web_console(tmp_path) -> None:
    """`dramaturg up` writes the gateway's console port into its config and prints where to sign in."""
    from dramaturg.services.gateway.config import GatewaySettings
    from dramaturg.shared.cli.stack import Stack, StackProcess, describe, gateway_config
    from dramaturg.shared.config import load_settings

    endpoints = {"speaker": "127.0.0.1:1"}
    with_console = load_settings(GatewaySettings, gateway_config(tmp_path, endpoints, 8181),
                                 env_prefix="DRAMATURG_GATEWAY_")
    assert with_console.console_port == 8181 and with_console.services == endpoints
    without = load_settings(GatewaySettings, gateway_config(tmp_path, endpoints),
                            env_prefix="DRAMATURG_GATEWAY_")
    assert without.console_port is None
    stack = Stack(home=str(tmp_path), token_file="t", console="http://127.0.0.1:8181/",
                  processes=[StackProcess("gateway", 1, 50051, 9090, "gw.log")])
    assert "web console: http://127.0.0.1:8181/" in describe(stack)
    stack.save(tmp_path / "stack.json")
    assert Stack.load(tmp_path / "stack.json").console == "http://127.0.0.1:8181/"
