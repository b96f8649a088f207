"""The files a finished job leaves under the gateway: its report, readable scripts and a timeline.

``analyze_scene`` writes

* ``report.json`` — the job's result (turns with speaker, character, text, scores, confidences);
* ``script.md`` and ``script.html`` — one line per turn with its scores (the HTML is self-contained:
  no script, no remote asset, every value escaped);
* ``timeline.png`` and ``timeline.svg`` — who speaks when, one row per diarized speaker, each turn
  coloured by its mean acting score (grey: not scored).

Writers run in a worker thread (matplotlib with its Agg backend, no display) and only ever write
inside the folder they are given; :func:`describe` lists what they wrote for ``Job.files``.
"""

from __future__ import annotations

import hashlib
import html
import json
import mimetypes
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dramaturg.gateway.v1 import gateway_pb2

# Mean acting score → colour: the scale's ends (1 and 5) and grey for a line nobody scored.
SCORE_RANGE = (1.0, 5.0)
UNSCORED = "#b0b0b0"
CONTENT_TYPES = {".md": "text/markdown; charset=utf-8", ".html": "text/html; charset=utf-8",
                 ".json": "application/json", ".svg": "image/svg+xml", ".png": "image/png"}

# (the job's result, the folder to write into, the job's work folder: what its stages left there)
ReportWriter = Callable[[dict[str, Any], Path, Path], None]


def _score(value: Any) -> str:
    return "—" if value is None else f"{float(value):.2f}"


def script_markdown(result: dict[str, Any]) -> str:
    """The Markdown script (the result's own ``script_markdown``) under a heading and a legend."""
    header = [f"# Scene analysis ({result.get('duration_seconds', 0):.1f} s)", ""]
    models = [f"{label}: `{result[key]}`" for key, label in
              (("diarization_model", "diarization"), ("transcription_model", "transcripts"),
               ("evaluator_model", "acting scores")) if result.get(key)]
    if models:
        header += ["Models — " + "; ".join(models) + ".", ""]
    skipped = result.get("skipped_stages") or {}
    header += [f"- **{stage} skipped:** {reason}" for stage, reason in skipped.items()]
    return "\n".join(header + ([""] if skipped else []) + [result.get("script_markdown", "")])


def script_html(result: dict[str, Any]) -> str:
    """A self-contained HTML script: one row per turn, per-dimension scores, every value escaped."""
    dimensions = sorted({d for turn in result.get("script", []) for d in turn.get("scores", {})})
    head = "".join(f"<th>{html.escape(d.replace('_', ' '))}</th>" for d in dimensions)
    rows = []
    for turn in result.get("script", []):
        scores = turn.get("scores", {})
        cells = "".join(f"<td class='num'>{_score(scores.get(d))}</td>" for d in dimensions)
        rows.append(
            "<tr>"
            f"<td class='num'>{turn['start']:.2f}–{turn['end']:.2f}</td>"
            f"<td>{html.escape(str(turn.get('speaker', '')))}</td>"
            f"<td>{html.escape(str(turn.get('voice_id') or '—'))}</td>"
            f"<td>{html.escape(str(turn.get('text') or '—'))}</td>"
            f"<td class='num'><b>{_score(turn.get('mean_score'))}</b></td>{cells}</tr>"
        )
    skipped = "".join(f"<p class='skip'><b>{html.escape(stage)} skipped:</b> {html.escape(reason)}</p>"
                      for stage, reason in (result.get("skipped_stages") or {}).items())
    title = f"Scene analysis ({result.get('duration_seconds', 0):.1f} s)"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }} .skip {{ color: #a60; }}
</style></head>
<body><h1>{html.escape(title)}</h1>{skipped}
<p><img src="timeline.svg" alt="timeline: who speaks when, coloured by acting score"></p>
<table><thead><tr><th>time (s)</th><th>speaker</th><th>character</th><th>line</th><th>mean</th>{head}</tr>
</thead>
<tbody>
{chr(10).join(rows)}
</tbody></table></body></html>
"""


def timeline_figure(result: dict[str, Any]) -> Any:
    """Who speaks when: a row per diarized speaker, each turn a bar coloured by its mean score."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    script = result.get("script", [])
    speakers = sorted({str(t["speaker"]) for t in script})
    figure = Figure(figsize=(10, 0.6 * max(len(speakers), 1) + 1.4))
    axes = figure.add_subplot()
    norm = Normalize(*SCORE_RANGE)
    cmap = colormaps["RdYlGn"]
    for turn in script:
        row = speakers.index(str(turn["speaker"]))
        score = turn.get("mean_score")
        colour = UNSCORED if score is None else cmap(norm(float(score)))
        axes.broken_barh([(turn["start"], turn["end"] - turn["start"])], (row - 0.4, 0.8), facecolors=colour)
    labels = []
    for speaker in speakers:
        names = {t.get("voice_id") for t in script if str(t["speaker"]) == speaker and t.get("voice_id")}
        labels.append(f"{speaker} ({', '.join(sorted(names))})" if names else speaker)
    axes.set_yticks(range(len(speakers)), labels)
    axes.set_xlim(0, max(float(result.get("duration_seconds", 0)), 1e-3))
    axes.set_xlabel("time (s)")
    axes.set_title("who speaks when, coloured by mean acting score (1–5; grey: not scored)")
    from matplotlib.cm import ScalarMappable

    figure.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes, label="mean score")
    figure.tight_layout()
    return figure


def write_scene_report(result: dict[str, Any], folder: Path, work: Path | None = None) -> None:
    """``analyze_scene``'s files (module docstring) into ``folder``."""
    (folder / "report.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    (folder / "script.md").write_text(script_markdown(result))
    (folder / "script.html").write_text(script_html(result))
    figure = timeline_figure(result)
    figure.savefig(folder / "timeline.png", dpi=120)
    figure.savefig(folder / "timeline.svg", metadata={"Date": None})


def describe(folder: Path) -> list[gateway_pb2.JobFile]:
    """``Job.files`` for what a writer left in ``folder`` (sorted by name; digests of the whole files)."""
    files = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        content_type = CONTENT_TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0]
        files.append(gateway_pb2.JobFile(
            name=path.name,
            size_bytes=path.stat().st_size,
            content_type=content_type or "application/octet-stream",
            sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        ))
    return files
