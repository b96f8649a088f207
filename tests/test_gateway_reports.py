"""A scene report's files: the scripts escape what the models wrote, the plot is a real image, and
``Job.files`` describes exactly what was written."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from dramaturg.services.gateway.engine import write_job_files
from dramaturg.services.gateway.pipelines import _scene_result
from dramaturg.services.gateway.reports import script_html, write_scene_report

HOSTILE = "<script>alert('x')</script> | and & more"


def scene_result(scored: bool = True) -> dict:
    outputs = {
        "decode": {"duration_seconds": 6.0},
        "diarize": {"rttm": "", "speakers": ["SPK_0", "SPK_1"], "model": "d:v1"},
        "identify": {
            "speaker_names": {"SPK_0": "captain"},
            "script": [
                {"start": 0.5, "end": 2.5, "speaker": "SPK_0", "confidence": 1.0, "voice_id": "captain",
                 "turn_voice_id": "captain", "score": 0.9},
                {"start": 3.0, "end": 5.5, "speaker": "SPK_1", "confidence": 1.0, "voice_id": "",
                 "turn_voice_id": "", "score": 0.1},
            ],
        },
        "transcribe": {"lines": [{"start": 0.5, "end": 2.5, "text": HOSTILE, "finish_reason": "stop"},
                                 {"start": 3.0, "end": 5.5, "text": "fine", "finish_reason": "stop"}],
                       "model": "a:v1"},
    }
    if scored:
        outputs["score"] = {"lines": [
            {"start": 0.5, "end": 2.5, "mean_score": 4.5, "scores": {"pitch_variation": 4.5},
             "digit_mass": 0.9, "pieces": 1},
            {"start": 3.0, "end": 5.5, "mean_score": 1.5, "scores": {"pitch_variation": 1.5},
             "digit_mass": 0.9, "pieces": 1},
        ], "model": "e:v1"}
    else:
        outputs["score"] = {"skipped": "no evaluator"}
    return _scene_result(outputs)


def test_the_html_script_escapes_what_the_models_wrote() -> None:
    page = script_html(scene_result())
    assert "<script>" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert page.count("<tr>") == 1 + 2  # the header row and one row per turn
    assert "4.50" in page and "1.50" in page


def test_the_markdown_script_keeps_one_row_per_turn() -> None:
    result = scene_result()
    rows = [r for r in result["script_markdown"].splitlines() if r.startswith("| ")]
    assert len(rows) == 1 + 2  # header + turns (the separator starts with "|-")
    assert "\\| and" in rows[1]  # a pipe in a transcript does not open a new column


@pytest.mark.parametrize("scored", [True, False])
def test_job_files_are_written_whole_and_described(tmp_path: Path, scored: bool) -> None:
    result = scene_result(scored)
    folder = tmp_path / "files"
    files = write_job_files(write_scene_report, result, folder)
    names = ["report.json", "script.html", "script.md", "timeline.png", "timeline.svg"]
    assert [f.name for f in files] == names
    for entry in files:
        data = (folder / entry.name).read_bytes()
        assert entry.size_bytes == len(data) and entry.sha256 == hashlib.sha256(data).hexdigest()
    assert (folder / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in (folder / "timeline.svg").read_bytes()
    assert json.loads((folder / "report.json").read_text())["script"][0]["text"] == HOSTILE
    markdown = (folder / "script.md").read_text()
    assert ("score skipped" in markdown) == (not scored)
    assert {f.content_type for f in files} >= {"image/png", "text/html; charset=utf-8"}
    again = write_job_files(write_scene_report, result, folder)  # a resumed job rewrites them whole
    assert [f.name for f in again] == [f.name for f in files] and not (tmp_path / "files.partial").exists()
