"""revoice_scene: re-record a scene's weak lines with the character's TTS voice, best take first.

After the analysis stages (``analyze_scene``'s diarize → identify → transcribe / score), the gateway

1. **select**s the lines to redo: those chosen by index (``line_ids``), else the ``max_lines`` lowest
   mean acting scores under ``threshold``; each needs a character (an identified voice) and its words
   (the client's ``script`` line that overlaps it most, else the audio LLM's transcript);
2. **synthesize**s ``candidates`` takes of each in the character's voice (TTS ``voice_id`` = the
   character's voice id; seeds ``seed``, ``seed`` + 1, …, so a job is repeatable);
3. judges every take three ways, side by side: **rank** (evaluator: realism scores with the character's
   context), **check_words** (audio LLM transcript → WER against the line's words, jiwer after
   lower-casing and dropping punctuation) and **check_voice** (speaker ``Verify`` against the enrolled
   voice);
4. **splice**s, per line, the best-scoring take that passes both guards (WER ≤ ``max_wer``; the
   speaker model's same-speaker decision, unless ``require_same_speaker`` is false) into the scene in
   place of the original: loudness matched to the original line (EBU R128 integrated loudness with
   pyloudnorm; RMS for lines shorter than one 400 ms gating block), timing kept (the take starts where
   the line did; a longer take is cut with a fade-out, a shorter one padded with silence) and 20 ms
   cross-fades at both edges. A line no take passes keeps its original audio, and the report says why.

The takes and the re-voiced scene are written under the job's work folder; the report files
(``report.json``, ``revoice.md``, ``revoiced.wav``) become the job's files.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import soundfile as sf
from dramaturg.common.v1 import common_pb2
from dramaturg.shared.grpc.errors import details_from_error, invalid_argument
from dramaturg.shared.scoring import word_error_rate

from .pipelines import (
    ANALYZE_SCENE,
    SAMPLE_RATE,
    PipelineSpec,
    StageContext,
    StageSpec,
    _encode_pcm16,
    check_scene_params,
    fan_out,
    remaining,
    role_context,
    scene_lines,
)

TAKES_DIR = "revoice"
CROSSFADE_SECONDS = 0.02
LOUDNESS_BLOCK_SECONDS = 0.4  # BS.1770's gating block: shorter audio has no integrated loudness
MAX_GAIN_DB = 24.0
DEFAULTS: dict[str, Any] = {"threshold": 3.0, "max_lines": 1, "candidates": 3, "seed": 1, "max_wer": 0.5,
                            "require_same_speaker": True}


def param(ctx: StageContext, name: str) -> Any:
    return ctx.params.get(name, DEFAULTS[name])


# ============================================================================================ select


def parse_script(given: Any) -> list[dict[str, Any]]:
    """The ``script`` parameter: [{start, end, text}, …] seconds, or INVALID_ARGUMENT naming the bad one."""
    if not isinstance(given, list):
        raise invalid_argument("params.script", "a list of {start, end, text}")
    lines = []
    for i, line in enumerate(given):
        ok = isinstance(line, dict) and isinstance(line.get("text"), str) and line["text"].strip()
        ok = ok and all(isinstance(line.get(k), int | float) and not isinstance(line.get(k), bool)
                        for k in ("start", "end"))
        if not ok or not 0 <= line["start"] < line["end"]:
            raise invalid_argument(f"params.script[{i}]", "needs start < end (seconds) and a non-empty text")
        lines.append({"start": float(line["start"]), "end": float(line["end"]), "text": line["text"].strip()})
    return lines


def overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))


def words_for(turn: dict[str, Any], script: list[dict[str, Any]], transcript: str) -> tuple[str, str]:
    """(text, where it came from): the client's script line overlapping the turn most (at least half of
    the shorter of the two), else the audio LLM's transcript, else nothing."""
    span = (turn["start"], turn["end"])
    best = max(script, key=lambda line: overlap(span, (line["start"], line["end"])), default=None)
    if best is not None:
        shared = overlap(span, (best["start"], best["end"]))
        if shared >= 0.5 * min(span[1] - span[0], best["end"] - best["start"]):
            return best["text"], "script"
    if transcript.strip():
        return transcript.strip(), "transcript"
    return "", ""


async def select_stage(ctx: StageContext) -> dict[str, Any]:
    """The lines to re-voice, each with its character, its words and its scores before."""
    lines = scene_lines(ctx)
    transcripts = {(t["start"], t["end"]): t["text"] for t in ctx.inputs["transcribe"].get("lines", [])}
    scores = {(t["start"], t["end"]): t for t in ctx.inputs["score"]["lines"]}
    script = parse_script(ctx.params.get("script", []))
    if "line_ids" in ctx.params:
        wanted = [int(i) for i in ctx.params["line_ids"]]
        bad = [i for i in wanted if not 0 <= i < len(lines)]
        if bad:
            raise invalid_argument("params.line_ids",
                                   f"{bad} not among the scene's {len(lines)} lines (0-based)")
        chosen = wanted
    else:
        mean = [scores[(t["start"], t["end"])]["mean_score"] for t in lines]
        ranked = sorted(range(len(lines)), key=lambda i: mean[i])
        below = [i for i in ranked if mean[i] < float(param(ctx, "threshold"))]
        chosen = below[: int(param(ctx, "max_lines"))]
    selected, passed_over = [], []
    for index in chosen:
        turn = lines[index]
        key = (turn["start"], turn["end"])
        text, source = words_for(turn, script, transcripts.get(key, ""))
        reason = ""
        if not turn.get("voice_id"):
            reason = "no identified character (enroll the voice in the speaker service)"
        elif not text:
            reason = "no words for it: send params.script, or run with an audio LLM"
        entry = {"index": index, "start": turn["start"], "end": turn["end"], "speaker": turn["speaker"],
                 "voice_id": turn.get("voice_id", ""), "text": text, "text_source": source,
                 "before": {k: scores[key][k] for k in ("mean_score", "scores")}}
        (passed_over if reason else selected).append(entry | ({"reason": reason} if reason else {}))
    await ctx.report(1.0, f"{len(selected)} line(s) to re-voice, {len(passed_over)} passed over")
    return {"lines": selected, "passed_over": passed_over}


# ========================================================================================== the takes


def _read(path: Path) -> np.ndarray:
    samples, rate = sf.read(path, dtype="float32", always_2d=False)
    if rate != SAMPLE_RATE:
        raise ValueError(f"{path}: {rate} Hz, expected {SAMPLE_RATE}")
    return samples


async def synthesize_stage(ctx: StageContext) -> dict[str, Any]:
    """``candidates`` TTS takes of every selected line in its character's voice, kept as 16 kHz WAVs."""
    import asyncio

    from dramaturg.tts.v1 import tts_pb2, tts_pb2_grpc

    folder = ctx.work_dir / TAKES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    stub = tts_pb2_grpc.TextToSpeechStub(ctx.channel("tts"))
    count = int(param(ctx, "candidates"))
    takes = [(line, k) for line in ctx.inputs["select"]["lines"] for k in range(count)]

    async def synthesize(item: tuple[dict[str, Any], int]) -> dict[str, Any]:
        line, k = item
        seed = int(param(ctx, "seed")) + k
        config = tts_pb2.SynthesisConfig(voice_id=line["voice_id"], sample_rate_hz=SAMPLE_RATE,
                                         encoding=common_pb2.WAV, seed=seed)
        reply = await stub.Synthesize(tts_pb2.SynthesizeRequest(request_id=ctx.job_id, text=line["text"],
                                                                config=config), timeout=remaining(ctx))
        name = f"line{line['index']:03d}_take{k}.wav"
        await asyncio.to_thread((folder / name).write_bytes, reply.audio.content)
        return {"line": line["index"], "take": k, "file": f"{TAKES_DIR}/{name}", "seed": reply.seed,
                "seconds": round(reply.audio.duration_seconds, 3),
                "model": f"{reply.model.name}:{reply.model.version}"}

    out = await fan_out(ctx, takes, synthesize, "synthesised take")
    return {"takes": out}


async def judged(call: Any, refused: dict[str, Any], check: str) -> dict[str, Any]:
    """A judge's verdict on one take, or ``refused`` with the service's reason when it will not judge
    that take (INVALID_ARGUMENT: say a take too short for the speaker model): the take then fails
    that check, and the job goes on with the others."""
    try:
        return await call
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.INVALID_ARGUMENT:
            raise
        return refused | {f"{check}_refused": details_from_error(error).message}


def _take_audio(ctx: StageContext, take: dict[str, Any]) -> common_pb2.AudioInput:
    return common_pb2.AudioInput(encoding=common_pb2.WAV, content=(ctx.work_dir / take["file"]).read_bytes())


def _line(ctx: StageContext, index: int) -> dict[str, Any]:
    return next(line for line in ctx.inputs["select"]["lines"] if line["index"] == index)


async def rank_stage(ctx: StageContext) -> dict[str, Any]:
    """The evaluator's realism scores of every take, with the character's context."""
    from dramaturg.evaluator.v1 import evaluator_pb2, evaluator_pb2_grpc

    stub = evaluator_pb2_grpc.EvaluatorStub(ctx.channel("evaluator"))
    dimensions = [str(d) for d in ctx.params.get("dimensions", [])]

    async def rank(take: dict[str, Any]) -> dict[str, Any]:
        line = _line(ctx, take["line"])
        request = evaluator_pb2.EvaluateRequest(
            request_id=ctx.job_id, audio=_take_audio(ctx, take), rubric=evaluator_pb2.REALISM,
            dimensions=dimensions, context=role_context(ctx, line["voice_id"], line["speaker"]))
        return await judged(evaluate(request), {"mean_score": None, "scores": {}}, "rank")

    async def evaluate(request: Any) -> dict[str, Any]:
        reply = await stub.Evaluate(request, timeout=remaining(ctx))
        return {"mean_score": round(reply.mean_score, 4), "scores": {s.dimension: round(s.score, 4)
                                                                   for s in reply.scores}}

    return {"takes": await fan_out(ctx, ctx.inputs["synthesize"]["takes"], rank, "ranked take")}


async def check_words_stage(ctx: StageContext) -> dict[str, Any]:
    """Does each take say its line? The audio LLM's transcript of the take, and its WER."""
    from dramaturg.audiollm.v1 import audiollm_pb2, audiollm_pb2_grpc

    stub = audiollm_pb2_grpc.AudioLLMStub(ctx.channel("audiollm"))

    async def check(take: dict[str, Any]) -> dict[str, Any]:
        line = _line(ctx, take["line"])
        request = audiollm_pb2.GenerateRequest(request_id=ctx.job_id, audio=_take_audio(ctx, take),
                                               task=audiollm_pb2.TRANSCRIBE)
        return await judged(transcribe(request, line["text"]), {"transcript": "", "wer": 1.0}, "words")

    async def transcribe(request: Any, words: str) -> dict[str, Any]:
        reply = await stub.Generate(request, timeout=remaining(ctx))
        return {"transcript": reply.text, "wer": round(word_error_rate(words, reply.text), 4)}

    return {"takes": await fan_out(ctx, ctx.inputs["synthesize"]["takes"], check, "transcribed take")}


async def check_voice_stage(ctx: StageContext) -> dict[str, Any]:
    """Does each take sound like its character? Speaker.Verify against the enrolled voice."""
    from dramaturg.speaker.v1 import speaker_pb2, speaker_pb2_grpc

    stub = speaker_pb2_grpc.SpeakerStub(ctx.channel("speaker"))

    async def check(take: dict[str, Any]) -> dict[str, Any]:
        line = _line(ctx, take["line"])
        request = speaker_pb2.VerifyRequest(request_id=ctx.job_id, voice_id=line["voice_id"],
                                            test_audio=_take_audio(ctx, take))
        return await judged(verify(request), {"similarity": None, "same_speaker": False, "threshold": None},
                            "voice")

    async def verify(request: Any) -> dict[str, Any]:
        reply = await stub.Verify(request, timeout=remaining(ctx))
        return {"similarity": round(reply.score, 4), "same_speaker": bool(reply.same_speaker),
                "threshold": round(reply.threshold, 4)}

    return {"takes": await fan_out(ctx, ctx.inputs["synthesize"]["takes"], check, "verified take")}


# ============================================================================================= splice


def match_loudness(
    take: np.ndarray, original: np.ndarray, rate: int = SAMPLE_RATE
) -> tuple[np.ndarray, dict[str, Any]]:
    """``take`` scaled to the original line's loudness: EBU R128 integrated loudness (pyloudnorm) when
    both are at least one gating block long and measurable, else RMS; the gain is capped at ±24 dB and
    the result kept below full scale."""
    import pyloudnorm

    block = round(LOUDNESS_BLOCK_SECONDS * rate)
    gain_db, method = math.nan, "EBU R128"
    if len(take) >= block and len(original) >= block:
        meter = pyloudnorm.Meter(rate)
        target, have = meter.integrated_loudness(original), meter.integrated_loudness(take)
        if math.isfinite(target) and math.isfinite(have):
            gain_db = target - have
    if not math.isfinite(gain_db):
        method = "RMS"
        rms_original = float(np.sqrt(np.mean(np.square(original)))) if len(original) else 0.0
        rms_take = float(np.sqrt(np.mean(np.square(take)))) if len(take) else 0.0
        gain_db = 20 * math.log10(rms_original / rms_take) if rms_original > 0 and rms_take > 0 else 0.0
    gain_db = float(np.clip(gain_db, -MAX_GAIN_DB, MAX_GAIN_DB))
    scaled = take * 10 ** (gain_db / 20)
    peak = float(np.max(np.abs(scaled))) if len(scaled) else 0.0
    if peak > 0.999:
        scaled = scaled * (0.999 / peak)
    return scaled.astype(np.float32), {"method": method, "gain_db": round(gain_db, 2)}


def fit_to_span(take: np.ndarray, length: int, fade: int) -> tuple[np.ndarray, str]:
    """The take in exactly ``length`` samples: cut with a fade-out when longer, padded when shorter."""
    if len(take) > length:
        out = take[:length].copy()
        n = min(fade, length)
        out[length - n:] *= np.linspace(1.0, 0.0, n, dtype=np.float32)
        return out, f"cut {(len(take) - length) / SAMPLE_RATE:.2f} s"
    out = np.zeros(length, dtype=np.float32)
    out[: len(take)] = take
    return out, f"padded {(length - len(take)) / SAMPLE_RATE:.2f} s"


def splice(scene: np.ndarray, start: float, end: float, take: np.ndarray,
           rate: int = SAMPLE_RATE) -> tuple[np.ndarray, str]:
    """``scene`` with ``[start, end)`` replaced by ``take`` (fitted to it), cross-faded at both edges.

    Outside the span the scene is untouched, sample for sample.
    """
    a, b = round(start * rate), min(round(end * rate), len(scene))
    length = b - a
    n = min(round(CROSSFADE_SECONDS * rate), length // 4)
    piece, fit = fit_to_span(take, length, n)
    out = scene.copy()
    if n > 0:
        ramp = np.linspace(0.0, 1.0, n, dtype=np.float32)
        piece[:n] = scene[a:a + n] * (1 - ramp) + piece[:n] * ramp
        piece[length - n:] = piece[length - n:] * (1 - ramp) + scene[b - n:b] * ramp
    out[a:b] = piece
    return out, fit


def choose(
    takes: list[dict[str, Any]], max_wer: float, require_same_speaker: bool
) -> tuple[dict[str, Any] | None, str]:
    """The best-scoring take that passes the guards, or None and why none did (a take the evaluator
    would not score is never chosen)."""
    passing = [t for t in takes if t["wer"] <= max_wer and (t["same_speaker"] or not require_same_speaker)
               and t["mean_score"] is not None]
    if passing:
        return max(passing, key=lambda t: t["mean_score"]), ""
    words = sum(t["wer"] > max_wer for t in takes)
    voice = sum(require_same_speaker and not t["same_speaker"] for t in takes)
    unscored = sum(t["mean_score"] is None for t in takes)
    return None, (f"no take passed the guards: {words} of {len(takes)} over WER {max_wer:g}, "
                  f"{voice} of {len(takes)} not the character's voice"
                  + (f", {unscored} of {len(takes)} not scored" if unscored else ""))


async def splice_stage(ctx: StageContext) -> dict[str, Any]:
    """Pick each line's best take that passes the guards and splice it into the scene."""
    import asyncio

    takes = [t | r | w | v for t, r, w, v in zip(
        ctx.inputs["synthesize"]["takes"], ctx.inputs["rank"]["takes"], ctx.inputs["check_words"]["takes"],
        ctx.inputs["check_voice"]["takes"], strict=True)]
    scene = (await ctx.audio.samples()).samples.copy()
    lines = []
    for line in ctx.inputs["select"]["lines"]:
        own = [t for t in takes if t["line"] == line["index"]]
        best, reason = choose(own, float(param(ctx, "max_wer")), bool(param(ctx, "require_same_speaker")))
        entry = {**line, "takes": own, "chosen": best["take"] if best else None}
        if best is None:
            entry["reason"] = reason
        else:
            audio = await asyncio.to_thread(_read, ctx.work_dir / best["file"])
            a, b = round(line["start"] * SAMPLE_RATE), round(line["end"] * SAMPLE_RATE)
            audio, loudness = match_loudness(audio, scene[a:b])
            scene, fit = splice(scene, line["start"], line["end"], audio)
            entry |= {"after": {"mean_score": best["mean_score"], "scores": best["scores"]},
                      "loudness": loudness, "fit": fit}
        lines.append(entry)
    replaced = sum(entry["chosen"] is not None for entry in lines)
    output: dict[str, Any] = {"lines": lines, "replaced": replaced}
    if replaced:
        path = ctx.work_dir / TAKES_DIR / "revoiced.wav"
        await asyncio.to_thread(path.write_bytes, _encode_pcm16(scene, SAMPLE_RATE))
        output["revoiced_file"] = f"{TAKES_DIR}/revoiced.wav"
    await ctx.report(1.0, f"re-voiced {replaced} of {len(lines)} line(s)")
    return output


# ========================================================================================= the pipeline


def revoice_result(outputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    spliced = outputs["splice"]
    return {
        "duration_seconds": outputs["decode"]["duration_seconds"],
        "lines": spliced["lines"],
        "passed_over": outputs["select"]["passed_over"],
        "replaced": spliced["replaced"],
        "revoiced_file": spliced.get("revoiced_file", ""),
        "skipped_stages": {name: out["skipped"] for name, out in outputs.items() if "skipped" in out},
    }


def revoice_markdown(result: dict[str, Any]) -> str:
    """Before / after per line, every take with its guards, and why a line kept its original audio."""
    out = [f"# Re-voiced {result['replaced']} of {len(result['lines'])} line(s)", ""]
    for line in result["lines"]:
        before = line["before"]["mean_score"]
        after = line.get("after", {}).get("mean_score")
        verdict = (f"take {line['chosen']}: mean score {before:.2f} → {after:.2f} "
                   f"({line['loudness']['method']} gain {line['loudness']['gain_db']:+.1f} dB, {line['fit']})"
                   if line["chosen"] is not None else f"kept the original ({line['reason']})")
        out += [f"## Line {line['index']} ({line['start']:.2f}–{line['end']:.2f} s, {line['voice_id']})", "",
                f"> {line['text']}  ({line['text_source']})", "", verdict, "",
                "| take | seed | mean score | WER | heard | similarity | same speaker |",
                "|---|---|---|---|---|---|---|"]
        for take in line["takes"]:
            heard = str(take["transcript"]).replace("|", "\\|")
            score = "—" if take["mean_score"] is None else f"{take['mean_score']:.2f}"
            similarity = "—" if take["similarity"] is None else f"{take['similarity']:.3f}"
            refused = "; ".join(f"{k.split('_')[0]}: {take[k]}" for k in ("rank_refused", "words_refused",
                                                                          "voice_refused") if take.get(k))
            out.append(f"| {take['take']} | {take['seed']} | {score} | {take['wer']:.2f} | {heard} | "
                       f"{similarity} | {'yes' if take['same_speaker'] else 'no'}"
                       + (f" ({refused})" if refused else "") + " |")
        out.append("")
    for line in result["passed_over"]:
        out.append(f"- line {line['index']} passed over: {line['reason']}")
    return "\n".join(out) + "\n"


def write_revoice_report(result: dict[str, Any], folder: Path, work: Path) -> None:
    """``report.json``, ``revoice.md`` and, when a line was replaced, ``revoiced.wav``."""
    import json
    import shutil

    (folder / "report.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    (folder / "revoice.md").write_text(revoice_markdown(result))
    if result["revoiced_file"]:
        shutil.copyfile(work / result["revoiced_file"], folder / "revoiced.wav")


def check_revoice_params(params: dict[str, Any]) -> None:
    """revoice_scene's params beyond their types: the characters, the script, the line ids."""
    check_scene_params(params)
    if "script" in params:
        parse_script(params["script"])
    ids = params.get("line_ids", [])
    if not all(isinstance(i, int | float) and float(i).is_integer() and i >= 0 for i in ids):
        raise invalid_argument("params.line_ids", "line indexes (0-based integers)")


def revoice_pipeline() -> PipelineSpec:
    """revoice_scene: the analysis stages, then select → synthesize → (rank, check_words, check_voice)
    → splice (this module)."""
    analysis = {s.name: s for s in ANALYZE_SCENE.stages}
    required = {name: replace(analysis[name], optional=False) for name in ("transcribe", "score")}
    takes = ("select", "synthesize")
    return PipelineSpec(
        name="revoice_scene",
        description="Re-record a scene's weakest lines (or the ones named) in the character's TTS voice: "
        "analyze_scene's stages, then N takes per line (tts), each scored (evaluator), transcribed "
        "(audiollm: does it say the line?) and verified (speaker: is it the character?); the best take "
        "that passes both guards is spliced in place of the original, loudness matched and cross-faded.",
        stages=(
            analysis["decode"], analysis["diarize"], analysis["identify"], required["transcribe"],
            required["score"],
            StageSpec("select", select_stage, depends_on=("identify", "transcribe", "score"),
                      timeout_seconds=60),
            StageSpec("synthesize", synthesize_stage, service="tts", depends_on=("select",),
                      timeout_seconds=1800),
            StageSpec("rank", rank_stage, service="evaluator", depends_on=takes,
                      timeout_seconds=1800),
            StageSpec("check_words", check_words_stage, service="audiollm", depends_on=takes,
                      timeout_seconds=1800),
            StageSpec("check_voice", check_voice_stage, service="speaker", depends_on=takes,
                      timeout_seconds=600),
            StageSpec("splice", splice_stage, depends_on=("decode", *takes, "rank", "check_words",
                                                                  "check_voice"), timeout_seconds=300),
        ),
        result=revoice_result,
        report=write_revoice_report,
        check=check_revoice_params,
        params={**ANALYZE_SCENE.params, "threshold": float, "max_lines": int, "line_ids": list,
                "candidates": int, "seed": int, "max_wer": float, "require_same_speaker": bool,
                "script": list},
    )


REVOICE_SCENE = revoice_pipeline()
