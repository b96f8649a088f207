"""The fish-speech data preparation of the TTS service, run as a fish-speech user runs it.

A tiny fish-speech tree (``SPK/clip.wav`` + ``clip.lab``, with the usual accidents: a clip without
transcript, a transcript without clip, an empty transcript, a clip too short to learn from, a file that
is not audio) goes through pair validation, EBU R128 normalisation, codec-token extraction with a tiny
random ``MimiModel`` and packing into fish-speech's protobuf shards, and each step is checked against
what it promises: reasons in the report, loudness on target, one frame per hop and batch-independent
codes, a killed extraction that continues where it stopped, shards that give back exactly what went in.
"""

from __future__ import annotations

import importlib.util
import math
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyloudnorm
import pytest
import soundfile as sf
import torch
from dramaturg.services.tts import dataset, extract, shards
from dramaturg.services.tts.dataset import Reason
from dramaturg.shared.audio import Audio, resample
from dramaturg.tts.v1.text_data_pb2 import TextData

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RATE_16K = 16_000
RATE_24K = 24_000


def speechlike(seconds: float, rate: int, level: float, seed: int, f0: float = 140.0) -> np.ndarray:
    """Harmonics under a syllable-rate envelope plus a little noise: loudness behaves like speech's."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * rate)) / rate
    voice = sum(np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6.28)) / k for k in range(1, 8))
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * 4.0 * t + rng.uniform(0, 6.28))
    x = voice * envelope + 0.05 * rng.standard_normal(len(t))
    return (level * x / np.max(np.abs(x))).astype(np.float32)


def write_clip(
    folder: Path, stem: str, samples: np.ndarray, rate: int, text: str | None, ext: str = ".wav"
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    audio = folder / f"{stem}{ext}"
    sf.write(str(audio), samples, rate)
    if text is not None:
        (folder / f"{stem}.lab").write_text(text + "\n", encoding="utf-8")
    return audio


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """Three speakers, seven good pairs at mixed rates / formats / levels, and six bad files."""
    root = tmp_path / "data"
    a, b, c = root / "SPK_A", root / "SPK_B", root / "SPK_C"
    write_clip(a, "SPK_A_00000", speechlike(0.93, RATE_16K, 0.05, 1), RATE_16K, "The lamp is out.")
    write_clip(a, "SPK_A_00001", speechlike(1.41, RATE_16K, 0.6, 2), RATE_16K, "Who left the door open?")
    write_clip(a, "SPK_A_00002", speechlike(2.05, RATE_16K, 0.2, 3), RATE_16K, "Nobody, sir.")
    stereo = np.stack([speechlike(1.2, RATE_24K, 0.3, 4), speechlike(1.2, RATE_24K, 0.2, 5)], axis=1)
    write_clip(b, "SPK_B_00000", stereo, RATE_24K, "Then the wind did it.")
    write_clip(
        b, "SPK_B_00001", speechlike(0.8, RATE_24K, 0.4, 6, 210.0), RATE_24K, "Wind has no hands.", ".flac"
    )
    write_clip(c, "SPK_C_00000", speechlike(1.6, RATE_24K, 0.3, 7, 180.0), RATE_24K, "I heard steps.", ".mp3")
    write_clip(c, "SPK_C_00001", speechlike(1.0, RATE_24K, 0.1, 8, 180.0), RATE_24K, "Twice.")
    # The accidents.
    write_clip(b, "SPK_B_nolab", speechlike(1.0, RATE_24K, 0.3, 9), RATE_24K, None)
    write_clip(b, "SPK_B_empty", speechlike(1.0, RATE_24K, 0.3, 10), RATE_24K, "   ")
    write_clip(c, "SPK_C_short", speechlike(0.2, RATE_24K, 0.3, 11), RATE_24K, "Ah.")
    (c / "SPK_C_corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk" + bytes(range(256)))
    (c / "SPK_C_corrupt.lab").write_text("Broken.\n")
    (a / "SPK_A_orphan.lab").write_text("Nothing to hear.\n")
    write_clip(root, "stray", speechlike(1.0, RATE_24K, 0.3, 12), RATE_24K, "No speaker folder.")
    return root


GOOD = {
    "SPK_A_00000.wav",
    "SPK_A_00001.wav",
    "SPK_A_00002.wav",
    "SPK_B_00000.wav",
    "SPK_B_00001.flac",
    "SPK_C_00000.mp3",
    "SPK_C_00001.wav",
}


def test_scan_lists_every_bad_file_with_its_reason(tree: Path) -> None:
    report = dataset.scan_dataset(tree)
    assert {p.audio.name for p in report.pairs} == GOOD
    assert report.speakers == ["SPK_A", "SPK_B", "SPK_C"]
    found = {(i.path.name, i.reason) for i in report.issues}
    assert found == {
        ("SPK_B_nolab.wav", Reason.MISSING_LAB),
        ("SPK_B_empty.lab", Reason.EMPTY_TEXT),
        ("SPK_C_short.wav", Reason.TOO_SHORT),
        ("SPK_C_corrupt.wav", Reason.UNREADABLE_AUDIO),
        ("SPK_A_orphan.lab", Reason.NO_AUDIO),
        ("stray.wav", Reason.NOT_IN_SPEAKER_FOLDER),
        ("stray.lab", Reason.NOT_IN_SPEAKER_FOLDER),
    }
    text = report.summary()
    assert "7 pairs from 3 speakers" in text
    for name, reason in found:
        assert name in text and str(reason) in text
    pair = next(p for p in report.pairs if p.audio.name == "SPK_B_00000.wav")
    assert (pair.text, pair.channels, pair.sample_rate) == ("Then the wind did it.", 2, RATE_24K)
    assert [i.reason for i in dataset.scan_dataset(tree, max_seconds=1.5).issues].count(Reason.TOO_LONG) == 2


def test_loudness_normalisation_hits_target_and_is_idempotent(tree: Path, tmp_path: Path) -> None:
    # A click track: quiet, so its gain is large, with 0.9 peaks that gain would clip.
    clicks = np.full(int(1.5 * RATE_24K), 0.0, np.float32)
    clicks += 0.002 * np.random.default_rng(0).standard_normal(len(clicks)).astype(np.float32)
    clicks[:: RATE_24K // 4] = 0.9
    write_clip(tree / "SPK_C", "SPK_C_clicks", clicks, RATE_24K, "Tap tap.")
    scan = dataset.scan_dataset(tree, min_seconds=0.1)  # lets the 0.2 s clip through: the short-clip path
    out = tmp_path / "normalised"

    report = dataset.normalize_loudness(scan.pairs, out, target_lufs=-23.0, peak_dbfs=-1.0)
    assert not report.failed and len(report.clips) == len(scan.pairs) == 9
    by_name = {c.pair.audio.name: c for c in report.clips}
    assert by_name["SPK_C_short.wav"].method == "short"
    assert by_name["SPK_C_00000.wav"].pair.audio.suffix == ".wav"  # MP3 kept lossless from here on
    assert by_name["SPK_B_00001.flac"].pair.audio.suffix == ".flac"
    limited = by_name["SPK_C_clicks.wav"]
    assert limited.peak_limited
    for clip in report.clips:
        samples, rate = sf.read(str(clip.pair.audio), dtype="float64")
        assert clip.pair.lab.read_text() == (tree / clip.pair.speaker / clip.pair.lab.name).read_text()
        assert rate == clip.pair.sample_rate
        assert np.max(np.abs(samples)) <= 10 ** (-1.0 / 20) + 1e-3, clip.pair.audio
        lufs, method = dataset.measure_loudness(samples, rate)
        assert method == clip.method
        if not clip.peak_limited:
            assert abs(lufs - -23.0) < 0.5, (clip.pair.audio.name, lufs)
    assert not any(c.peak_limited for c in report.clips if c is not limited)
    # The standard meter agrees on the clips long enough for it.
    samples, rate = sf.read(str(by_name["SPK_A_00002.wav"].pair.audio))
    assert abs(pyloudnorm.Meter(rate).integrated_loudness(samples) + 23.0) < 0.5

    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = dataset.normalize_loudness(scan.pairs, out)
    assert not again.clips and len(again.skipped) == 9 and not again.failed
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == mtimes
    assert [p.audio for p in again.pairs] == [p.audio for p in report.pairs]
    assert not list(out.rglob("*.part"))
    # The normalised tree is itself a clean fish-speech tree.
    assert {p.audio.stem for p in dataset.scan_dataset(out, min_seconds=0.1).pairs} == {
        p.audio.stem for p in scan.pairs
    }


# --------------------------------------------------------------------------------------------------
# Codec tokens


@pytest.fixture(scope="module")
def mimi() -> torch.nn.Module:
    """A tiny random Mimi with Mimi's real geometry (24 kHz, 1920-sample frames, 12.5 Hz).

    Random Mimi codebooks start all-zero (``embed_sum``), which would give every frame code 0 and make
    every comparison below vacuous; random codebooks give codes that depend on the audio.
    """
    from transformers import MimiConfig, MimiModel

    torch.manual_seed(0)
    config = MimiConfig(
        sampling_rate=RATE_24K,
        upsampling_ratios=[8, 6, 5, 4],
        hidden_size=32,
        num_filters=4,
        codebook_size=64,
        codebook_dim=16,
        num_quantizers=8,
        vector_quantization_hidden_dimension=16,
        num_hidden_layers=1,
        intermediate_size=32,
        num_attention_heads=2,
        num_key_value_heads=2,
        upsample_groups=32,
    )
    model = MimiModel(config).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("embed_sum"):
                buffer.copy_(torch.randn(buffer.shape, generator=generator))
    assert extract.codec_geometry(model) == extract.CodecGeometry(RATE_24K, 1920)
    return model


class CountingCodec:
    """Mimi behind a wrapper that counts the clips it encodes and can die after some batches."""

    def __init__(self, model: torch.nn.Module, die_after_batches: int | None = None) -> None:
        self.model, self.config = model, model.config
        self.clips = self.batches = 0
        self.die_after_batches = die_after_batches

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return self.model.parameters()

    def encode(self, input_values: torch.Tensor, padding_mask: torch.Tensor) -> Any:
        if self.die_after_batches is not None and self.batches >= self.die_after_batches:
            raise KeyboardInterrupt("killed")
        self.batches += 1
        self.clips += input_values.shape[0]
        return self.model.encode(input_values, padding_mask)


def codec_input(path: Path) -> np.ndarray:
    """What extraction feeds the codec for a clip: mono, at 24 kHz."""
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    return resample(Audio(data.mean(axis=1), rate), RATE_24K).samples


def test_extracted_codes_have_one_frame_per_hop_and_do_not_depend_on_batching(
    tree: Path, tmp_path: Path, mimi: torch.nn.Module
) -> None:
    one_by_one = tmp_path / "one_by_one"
    shutil.copytree(tree, one_by_one)
    report, scan = extract.extract_tree(mimi, tree, batch_size=4, num_workers=0)
    assert {i.path.name for i in scan.issues} >= {"SPK_C_corrupt.wav", "SPK_B_nolab.wav"}
    assert len(report.written) == 7 and not report.failed and not report.skipped
    assert not (tree / "SPK_C" / "SPK_C_corrupt.npy").exists()
    single, _ = extract.extract_tree(mimi, one_by_one, batch_size=1, sort_by_length=False)
    assert len(single.written) == 7

    with torch.inference_mode():
        for pair in scan.pairs:
            codes = np.load(extract.npy_path(pair.audio))
            wave = codec_input(pair.audio)
            frames = math.ceil(len(wave) / 1920)
            assert codes.dtype == np.int64 and codes.shape == (8, frames), pair.audio.name
            assert codes.min() >= 0 and codes.max() < 64
            assert len(np.unique(codes[0])) > 1 or frames == 1  # the codebooks are not degenerate
            # Batched == one by one, exactly.
            twin = np.load(extract.npy_path(one_by_one / pair.speaker / pair.audio.name))
            np.testing.assert_array_equal(codes, twin)
            # Against the codec on the clip alone: same frame count; same codes but for the partial last
            # frame (Mimi pads a partial frame per layer); identical when the clip is padded to whole frames.
            alone = mimi.encode(torch.from_numpy(wave)[None, None]).audio_codes[0].numpy()
            assert alone.shape == codes.shape
            np.testing.assert_array_equal(alone[:, :-1], codes[:, :-1])
            padded = np.pad(wave, (0, frames * 1920 - len(wave)))
            whole = mimi.encode(torch.from_numpy(padded)[None, None]).audio_codes[0].numpy()
            np.testing.assert_array_equal(whole, codes)


def test_a_killed_extraction_continues_without_recomputing(
    tree: Path, mimi: torch.nn.Module, tmp_path: Path
) -> None:
    pairs = dataset.scan_dataset(tree).pairs
    dying = CountingCodec(mimi, die_after_batches=2)
    with pytest.raises(KeyboardInterrupt):
        extract.extract_codes(dying, pairs, batch_size=2, sort_by_length=False)
    done = sorted(tree.rglob("*.npy"))
    assert len(done) == 4 and dying.clips == 4
    mtimes = {p: p.stat().st_mtime_ns for p in done}
    # A write cut short by the kill: a partial temporary file beside a clip that has no codes yet.
    todo = next(p for p in pairs if not extract.npy_path(p.audio).exists())
    partial = todo.audio.parent / f".{todo.audio.stem}.npy.x1y2z3.part"
    partial.write_bytes(b"\x93NUMPY garbage")

    counting = CountingCodec(mimi)
    report = extract.extract_codes(counting, pairs, batch_size=2)
    assert counting.clips == 3 and len(report.written) == 3 and len(report.skipped) == 4
    assert {p: p.stat().st_mtime_ns for p in done} == mtimes
    assert np.load(extract.npy_path(todo.audio)).shape[0] == 8
    assert not [p for p in tree.rglob("*.part") if p != partial]  # only the stale one, ignored

    # And the result is what an uninterrupted run gives.
    fresh = tmp_path / "fresh"
    shutil.copytree(tree, fresh, ignore=shutil.ignore_patterns("*.npy", "*.part"))
    extract.extract_codes(mimi, dataset.scan_dataset(fresh).pairs, batch_size=3)
    for pair in pairs:
        np.testing.assert_array_equal(
            np.load(extract.npy_path(pair.audio)),
            np.load(extract.npy_path(fresh / pair.speaker / pair.audio.name)),
        )
    assert extract.extract_codes(CountingCodec(mimi), pairs).written == []


def test_unreadable_clip_is_reported_and_its_batch_still_encoded(tree: Path, mimi: torch.nn.Module) -> None:
    clips = [tree / "SPK_C" / "SPK_C_corrupt.wav", tree / "SPK_C" / "SPK_C_00001.wav"]
    report = extract.extract_codes(mimi, clips, batch_size=2)
    assert [i.path.name for i in report.failed] == ["SPK_C_corrupt.wav"]
    assert report.failed[0].reason == Reason.UNREADABLE_AUDIO
    assert [p.name for p in report.written] == ["SPK_C_00001.npy"]


def test_a_codec_with_another_frame_rate_is_refused(tree: Path, mimi: torch.nn.Module) -> None:
    with pytest.raises(RuntimeError, match="frame rate"):
        extract.extract_codes(mimi, [tree / "SPK_A" / "SPK_A_00001.wav"], hop_length=960)
    assert not list(tree.rglob("*.npy"))


# --------------------------------------------------------------------------------------------------
# Shards


def fake_codes(rng: np.random.Generator, frames: int, codebooks: int = 8) -> np.ndarray:
    return rng.integers(0, 2048, size=(codebooks, frames), dtype=np.int64)


def test_shards_round_trip_exactly_and_stream_across_shards(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    root, expected = tmp_path / "data", {}
    for s in range(3):
        speaker = f"SPK_{s}"
        for j in range(4):
            stem = root / speaker / f"{speaker}_{j:05d}"
            stem.parent.mkdir(parents=True, exist_ok=True)
            codes = fake_codes(rng, int(rng.integers(5, 40)))
            text = f"Line {j} of speaker {s}, with ünïcode — and “quotes”."
            np.save(stem.with_suffix(".npy"), codes)
            stem.with_suffix(".lab").write_text(text + "\n", encoding="utf-8")
            expected[(speaker, text)] = codes
    (root / "SPK_2" / "SPK_2_nolab.npy").write_bytes(b"")  # codes without text: reported
    np.save(root / "SPK_1" / "SPK_1_bad.npy", np.zeros(5))  # float, not codes
    (root / "SPK_1" / "SPK_1_bad.lab").write_text("bad")

    out = tmp_path / "shards"
    report = shards.build_shards(root, out, max_shard_bytes=1500, max_sentences_per_record=2)
    assert report.speakers == {"SPK_0": 4, "SPK_1": 4, "SPK_2": 4}
    assert {(i.path.name, i.reason) for i in report.issues} == {
        ("SPK_2_nolab.npy", Reason.MISSING_LAB),
        ("SPK_1_bad.npy", Reason.UNREADABLE_CODES),
    }
    files = shards.shard_files(out)
    assert files == report.shards and len(files) >= 3
    assert [f.name for f in files] == [f"{i:08d}.protos" for i in range(len(files))]
    assert not list(out.glob(".*"))
    for f in files:  # within the limit unless one record alone is larger
        records = list(shards.iter_records(f.open("rb")))
        assert f.stat().st_size <= 1500 or len(records) == 1

    samples = list(shards.iter_samples(out))
    assert len(samples) == 12
    got = {(s.speaker, s.text): s.codes for s in samples}
    assert got.keys() == expected.keys()
    for key, codes in expected.items():
        assert got[key].dtype == np.int64
        np.testing.assert_array_equal(got[key], codes)
    groups = list(shards.iter_text_data(files))
    assert all(g.source == "folder" and len(g.sentences) <= 2 for g in groups)

    # The wire format: little-endian uint32 length, then a TextData.
    raw = files[0].read_bytes()
    (size,) = struct.unpack("<I", raw[:4])
    first = TextData.FromString(raw[4 : 4 + size])
    assert first.name == "SPK_0" and len(first.sentences[0].semantics) == 8

    with pytest.raises(FileExistsError):
        shards.build_shards(root, out)
    assert len(shards.build_shards(root, out, overwrite=True).shards) == 1  # default 10 MiB: one shard


def test_shard_writer_and_reader_edge_cases(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    with shards.ShardWriter(tmp_path / "s", max_shard_bytes=400) as writer:
        for i in range(6):
            sentences = [shards.make_sentence([f"text {i}", f"alt {i}"], fake_codes(rng, 10, 2))]
            writer.write(TextData(source="folder", name=f"v{i}", sentences=sentences))
    assert writer.records == 6 and len(writer.shards) > 1
    names = [t.name for t in shards.iter_text_data(tmp_path / "s")]
    assert names == [f"v{i}" for i in range(6)]
    assert list(shards.iter_text_data(tmp_path / "s"))[2].sentences[0].texts == ["text 2", "alt 2"]

    # A writer that fails mid-shard keeps the finished shards and leaves no partial one.
    with pytest.raises(RuntimeError), shards.ShardWriter(tmp_path / "f", max_shard_bytes=400) as failing:
        for i in range(6):
            sentence = shards.make_sentence("t", fake_codes(rng, 60, 2))
            failing.write(TextData(name=f"v{i}", sentences=[sentence]))
            if i == 4:
                raise RuntimeError("disk full")
    assert len(failing.shards) == 4  # v0..v3, one record each; v4's shard was in progress
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == [p.name for p in failing.shards]
    assert [t.name for t in shards.iter_text_data(failing.shards)] == ["v0", "v1", "v2", "v3"]

    # A damaged shard is named, not misread.
    bad = tmp_path / "bad.protos"
    bad.write_bytes(writer.shards[0].read_bytes()[:-3])
    with pytest.raises(ValueError, match=r"bad\.protos"):
        list(shards.iter_samples(bad))
    for codes in (np.array([[-1, 2]]), np.array([[0.5, 1.0]]), np.zeros(3, np.int64)):
        with pytest.raises(ValueError):
            shards.make_sentence("x", codes)
    assert shards.clean_text("  Hello {laughs}  <break time='1s'/> world\n") == "Hello world"


FISH_SPEECH_SCHEMA = """syntax = "proto3";
package text_data;
message Semantics { repeated uint32 values = 1; }
message Sentence { repeated string texts = 1; repeated Semantics semantics = 3; }
message TextData { string source = 1; string name = 2; repeated Sentence sentences = 4; }
"""


def test_shards_parse_with_fish_speechs_own_schema(tmp_path: Path) -> None:
    """Byte compatibility with fish-speech: its text-data.proto (messages as upstream) reads our shard."""
    from grpc_tools import protoc

    (tmp_path / "text-data.proto").write_text(FISH_SPEECH_SCHEMA)
    assert protoc.main(["protoc", f"-I{tmp_path}", f"--python_out={tmp_path}", "text-data.proto"]) == 0
    spec = importlib.util.spec_from_file_location("fish_text_data_pb2", tmp_path / "text_data_pb2.py")
    assert spec and spec.loader
    fish = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fish)

    codes = fake_codes(np.random.default_rng(2), 7)
    with shards.ShardWriter(tmp_path / "out") as writer:
        writer.write(TextData(source="folder", name="SPK", sentences=[shards.make_sentence("Hi.", codes)]))
    raw = writer.shards[0].read_bytes()
    theirs = fish.TextData.FromString(raw[4:])
    assert theirs.name == "SPK" and list(theirs.sentences[0].texts) == ["Hi."]
    np.testing.assert_array_equal(np.array([list(s.values) for s in theirs.sentences[0].semantics]), codes)
    assert TextData.FromString(theirs.SerializeToString()) == TextData.FromString(raw[4:])
