"""The checked-in stubs are exactly what `make proto` generates from proto/."""

from __future__ import annotations

from pathlib import Path

from dramaturg.shared import protogen


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    written = protogen.generate(tmp_path)
    assert written, "protoc generated nothing"
    for path in written:
        checked_in = protogen.PROTO_ROOT / path.relative_to(tmp_path)
        assert checked_in.exists(), f"{checked_in} is missing: run `make proto`"
        assert checked_in.read_bytes() == path.read_bytes(), (
            f"{checked_in} drifted from its .proto: run `make proto`"
        )
    generated = {p.relative_to(tmp_path) for p in written}
    stale = [
        p
        for p in protogen.PROTO_ROOT.rglob("*_pb2*.py*")
        if p.relative_to(protogen.PROTO_ROOT) not in generated
    ]
    assert not stale, f"stubs without a .proto: {stale}"


def test_every_service_has_a_v1_contract() -> None:
    packages = {p.parts[1] for p in protogen.proto_files()}
    assert {
        "common",
        "training",
        "diarization",
        "speaker",
        "tts",
        "audiollm",
        "evaluator",
        "gateway",
    } <= packages
    for path in protogen.proto_files():
        text = (protogen.PROTO_ROOT / path).read_text()
        assert f"package dramaturg.{path.parts[1]}.v1;" in text, path
