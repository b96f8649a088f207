"""DeepSpeed ZeRO for recipes that train with the Hugging Face ``Trainer``: its config files and its traps.

A recipe config names a DeepSpeed config in its ``deepspeed`` key: ``zero1``, ``zero2`` or ``zero3``
(the files in ``zero_configs/``, Speech-DRAME's ``conf/ds_zero{1,2,3}.json`` in the Trainer's "auto"
form: batch sizes, accumulation, clipping, bf16 and bucket sizes come from the recipe's own keys), or
the path of the user's own JSON (offloading, a DeepSpeed optimizer …). The recipe passes the file to
``TrainingArguments(deepspeed=…)``; the Trainer and accelerate do the rest — DeepSpeed is not driven
by hand here.

The shipped files carry no ``optimizer`` or ``scheduler`` section, so the recipe's own AdamW and
schedule stay in force and no DeepSpeed op needs compiling (a CPU-offloaded or fused optimizer from a
user's file is built by DeepSpeed's JIT, which needs a compiler and, on a GPU, the CUDA toolkit).

Three traps this module keeps in one place:

* DeepSpeed always joins a process group. Under ``torchrun`` the environment has one; a single
  worker process gets a one-process group on a free local port (:func:`single_process_group`).
* ZeRO-3 partitions every parameter across the ranks: whatever reads weights outside the Trainer's
  forward (merging LoRA, ``save_pretrained``) must gather them first (:func:`gathered`). Gathering is
  collective, so in a run of several processes every rank must take part — which this project's
  rank-0 evaluation and publishing do not do: ZeRO-3 runs in one process (:func:`check`).
* A 4-bit QLoRA base cannot be partitioned by ZeRO-3 here (its quantised storage is bitsandbytes'),
  so that pair is refused by name.

Nothing here imports torch or deepspeed at module level: the server validates configs with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CONFIGS_DIR = Path(__file__).with_name("zero_configs")
PRESETS: dict[str, Path] = {f"zero{stage}": CONFIGS_DIR / f"ds_zero{stage}.json" for stage in (1, 2, 3)}
KEY = "deepspeed"  # the recipe config key
INSTALL_HINT = "install the evaluator extra (pip install 'dramaturg[evaluator]'), which pins deepspeed"


def resolve(value: str) -> Path | None:
    """The DeepSpeed config a recipe's ``deepspeed`` value names: None for "", a shipped preset by name,
    else the user's JSON file. Raises ValueError with what to write instead."""
    value = str(value or "").strip()
    if not value:
        return None
    if value in PRESETS:
        return PRESETS[value]
    path = Path(value).expanduser()
    if not path.is_file():
        raise ValueError(f"deepspeed {value!r}: neither {', '.join(PRESETS)} nor a DeepSpeed JSON file")
    return path.resolve()


def load(path: Path) -> dict[str, Any]:
    """The config as a dict, checked for what DeepSpeed and the Trainer would refuse later, less clearly."""
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"deepspeed config {path}: not readable JSON ({error})") from error
    if not isinstance(config, dict):
        raise ValueError(f"deepspeed config {path}: expected a JSON object")
    stage = zero_stage(config)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"deepspeed config {path}: zero_optimization.stage {stage!r}; expected 0, 1, 2 or 3")
    return config


def zero_stage(config: dict[str, Any]) -> int:
    section = config.get("zero_optimization") or {}
    return int(section.get("stage", 0)) if isinstance(section, dict) else -1


def check(value: str, *, processes: int = 1, quantized: bool = False) -> Path | None:
    """Validate a recipe's ``deepspeed`` value before any model is built; the config's path (None: off).

    Also checks that deepspeed imports: the Trainer needs it to accept the file at all.
    """
    path = resolve(value)
    if path is None:
        return None
    stage = zero_stage(load(path))
    if stage == 3 and processes > 1:
        raise ValueError(f"deepspeed {value!r} (ZeRO-3) partitions the weights across processes, and this "
                         "recipe evaluates and publishes on rank 0 alone: run ZeRO-3 in one process "
                         "(nproc_per_node: 1) or use zero2 across several")
    if stage == 3 and quantized:
        raise ValueError(f"deepspeed {value!r} (ZeRO-3) cannot partition a 4-bit QLoRA base: use zero2, "
                         "or peft lora in bf16 with zero3")
    try:
        import deepspeed  # noqa: F401
    except ImportError as error:
        raise ValueError(f"deepspeed {value!r}: the deepspeed package does not import ({error}); "
                         f"{INSTALL_HINT}") from error
    return path


def describe(trainer: Any) -> str:
    """A phrase for the run's log saying what DeepSpeed does in this Trainer ("" when it is off)."""
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return ""
    path = Path(str(trainer.args.deepspeed))
    return f"DeepSpeed ZeRO-{zero_stage(load(path))} ({path.name})"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def single_process_group() -> dict[str, str]:
    """Set what ``torch.distributed`` reads to join a group (a one-process group on a free local port)
    unless ``torchrun`` already did; returns what was set. DeepSpeed initialises a group even for one
    process, and without these variables it tries MPI discovery and fails."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return {}
    values = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "LOCAL_RANK": "0",
              "WORLD_SIZE": "1"}
    for name, value in values.items():
        os.environ.setdefault(name, value)
    return values


def zero3_enabled() -> bool:
    """Whether the running Trainer partitions parameters (ZeRO-3): transformers keeps that state."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return bool(is_deepspeed_zero3_enabled())


@contextlib.contextmanager
def gathered(model: Any) -> Iterator[None]:
    """Every parameter of ``model`` whole (and on this rank) while the block runs; a no-op unless ZeRO-3
    partitions them. Changes made inside are not written back: the block reads (merges, saves)."""
    if not zero3_enabled():
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        yield
