"""shared/training/zero.py: the DeepSpeed configs a recipe names, and what is refused before a run starts.

The configs' acceptance by the Trainer and DeepSpeed itself (initialised, trained, gathered, published)
is checked by tests/test_evaluator_train.py's DeepSpeed runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dramaturg.shared.training import zero


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_each_shipped_config_is_its_zero_stage_in_the_trainers_auto_form(stage: int) -> None:
    path = zero.resolve(f"zero{stage}")
    assert path == zero.CONFIGS_DIR / f"ds_zero{stage}.json"
    config = zero.load(path)
    assert zero.zero_stage(config) == stage
    # batch sizes, accumulation and clipping follow the recipe's keys (the Trainer fills "auto")
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert config[key] == "auto", key
    # the recipe's own AdamW and schedule stay in force: nothing for DeepSpeed to compile
    assert "optimizer" not in config and "scheduler" not in config
    if stage == 3:  # the Trainer's checkpoint gathers the 16-bit weights it saves
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_empty_means_off_and_a_users_file_is_taken_as_is(tmp_path: Path) -> None:
    assert zero.resolve("") is None and zero.check("") is None
    own = tmp_path / "ds.json"
    own.write_text(json.dumps({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}))
    assert zero.resolve(str(own)) == own.resolve()
    assert zero.check(str(own), processes=2) == own.resolve()


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", "not readable JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"zero_optimization": {"stage": 5}}', r"stage 5; expected 0, 1, 2 or 3"),
])
def test_a_broken_config_file_is_named_with_its_fault(content: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        zero.check(str(path))


def test_unknown_names_and_unsupported_pairs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither zero1, zero2, zero3 nor a DeepSpeed JSON file"):
        zero.check("zero4")
    with pytest.raises(ValueError, match="run ZeRO-3 in one process"):
        zero.check("zero3", processes=2)
    with pytest.raises(ValueError, match="cannot partition a 4-bit QLoRA base"):
        zero.check("zero3", quantized=True)
    assert zero.check("zero2", processes=2, quantized=True) == zero.PRESETS["zero2"]


def test_one_process_gets_its_own_group_unless_torchrun_made_one(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.setenv(name, "")  # recorded, so what the call sets is undone after the test
        monkeypatch.delenv(name)
    values = zero.single_process_group()
    assert values["RANK"] == "0" and values["WORLD_SIZE"] == "1" and int(values["MASTER_PORT"]) > 0
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert zero.single_process_group() == {}
