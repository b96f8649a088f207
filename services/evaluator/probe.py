"""A training aid for an evaluator trained from scratch: a score probe on the audio tokens (``probe_weight``).

Speech-DRAME fine-tunes a Qwen2-Audio whose Whisper encoder already hears pitch, pace and loudness. The
tiny evaluator trained here starts from random weights, and the answer loss alone does not teach its
encoder to hear anything: full SFT learns the answer format and the labels' middle, then answers the
same score for every clip (README, "The evaluator service"). The audio LLM met the same wall and got
past it with auxiliary losses on what the encoder hands the language model (``ctc_weight``,
``query_ctc_weight``); this is the evaluator's counterpart.

:class:`ScoreProbe` reads the clip's scores — one output per dimension — linearly from the mean of the
projected audio tokens (the vectors written over the ``<|AUDIO|>`` positions, the ones the language model
reads). :class:`ProbedSFTTrainer` adds ``probe_weight`` × the squared error of the row's dimension
(against the raters' mean, scaled to [-1, 1]) to TRL's answer loss. Its gradient reaches the projector
and the audio encoder only, so it needs ``peft: full`` (every other method keeps the encoder frozen);
the language model still has to learn to read the tokens and answer. A mean of frames is what the
language model's attention can take too: the probe asks every token to carry the clip's prosody.

The probe is a submodule of the model while it trains (``score_probe``), so the Trainer's optimizer,
gradient clipping and checkpoints (resume included) cover it; it is never published
(:func:`without_probe` around every save of a standalone model). Off by default, and for a pretrained
evaluator, whose encoder needs no such help.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from trl import SFTTrainer

PROBE = "score_probe"
"""The probe's attribute on the model while it trains (and its prefix in the Trainer's checkpoints)."""


def scaled(scores: torch.Tensor) -> torch.Tensor:
    """1..5 → -1..1, the probe's target scale."""
    return (scores - 3.0) / 2.0


class ScoreProbe(nn.Module):
    """Scores per dimension, linear in the mean of a clip's projected audio tokens (module docstring)."""

    def __init__(self, width: int, dimensions: Sequence[str]) -> None:
        super().__init__()
        if not dimensions:
            raise ValueError("the score probe needs the run's dimensions (config `dimensions`)")
        self.dimensions = list(dimensions)
        self.head = nn.Linear(width, len(self.dimensions))

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``tokens`` (clips, frames, width), ``lengths`` (clips,) valid frames → (clips, dimensions)."""
        frames = torch.arange(tokens.shape[1], device=tokens.device)[None, :]
        mask = (frames < lengths.to(tokens.device)[:, None]).to(tokens.dtype).unsqueeze(-1)
        pooled = (tokens * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.head(pooled)


def attach_probe(model: nn.Module, dimensions: Sequence[str]) -> ScoreProbe:
    """A new probe on ``model`` (a full Qwen2-Audio), as wide as its language model, on its device."""
    width = int(model.config.text_config.hidden_size)
    probe = ScoreProbe(width, dimensions).to(next(model.parameters()).device)
    model.add_module(PROBE, probe)
    return probe


@contextmanager
def without_probe(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with its probe taken off for as long as the block runs (a save that publishes)."""
    probe = model._modules.pop(PROBE, None)
    try:
        yield model
    finally:
        if probe is not None:
            model.add_module(PROBE, probe)


def probe_fields(rows: Sequence[Mapping[str, Any]], dimensions: Sequence[str]) -> dict[str, torch.Tensor]:
    """The collator's extra columns: each row's dimension index and its reference score (1..5)."""
    return {
        "probe_index": torch.tensor([list(dimensions).index(str(r["dimension"])) for r in rows]),
        "probe_target": torch.tensor([float(r["reference"]) for r in rows], dtype=torch.float32),
    }


class ProbedSFTTrainer(SFTTrainer):
    """TRL's ``SFTTrainer`` plus ``probe_weight`` × the score probe's squared error (module docstring).

    The projected audio tokens are caught by a forward hook on the projector during TRL's own forward
    (no second pass); the probe's loss is logged as ``probe_loss`` with TRL's metrics.
    """

    def __init__(self, *args: Any, probe_weight: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.probe_weight = float(probe_weight)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        index = inputs.pop("probe_index")
        target = inputs.pop("probe_target")
        core = model.module if hasattr(model, "module") else model  # DDP / accelerate wrappers
        caught: list[torch.Tensor] = []
        hook = core.model.multi_modal_projector.register_forward_hook(
            lambda _module, _args, output: caught.append(output) if not caught else None
        )
        try:  # return_outputs only when asked: TRL recomputes the logits for it with a second forward
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
        finally:
            hook.remove()
        if not caught:
            raise RuntimeError("the score probe saw no audio tokens: the batch has no input_features")
        _, lengths = core.model.audio_tower._get_feat_extract_output_lengths(
            inputs["feature_attention_mask"].sum(-1)
        )
        scores = getattr(core, PROBE)(caught[0], lengths)
        predicted = scores.gather(1, index.to(scores.device)[:, None]).squeeze(1)
        probe_loss = nn.functional.mse_loss(predicted.float(), scaled(target.to(scores.device)))
        mode = "train" if model.training else "eval"
        self._metrics[mode]["probe_loss"].append(float(probe_loss.detach()))
        loss = result[0] if return_outputs else result
        loss = loss + self.probe_weight * probe_loss.to(loss.dtype)
        return (loss, result[1]) if return_outputs else loss
