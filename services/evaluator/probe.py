"""Training aids for an evaluator trained from scratch: a score probe on the audio tokens and its friends.

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

**Contours** (``contour_weight``): a clip-level score is one number per clip, and 960 clips teach a random
encoder little. The probe's second head reads three numbers from *each* audio token — voicing, F0 in
semitones relative to the clip's median, and level in dB below the clip's loudest frame — against what
the corpus's own numpy YIN tracker and RMS meter (``shared/data/prosody.py``, the functions the labels
are computed with) measure on the four 10 ms frames the token covers. That is FastSpeech 2's pitch and
energy targets turned around: dense supervision (dozens of targets per clip) of exactly the quantities
the prosody dimensions summarise, measured on the audio itself, so it applies to any dataset (no label,
transcript or corpus metadata is read).

**The served score** (``score_weight``): the answer loss is a cross-entropy on one rounded digit; the
service returns the expected value over the digits' probabilities. ``score_weight`` adds the squared
error of that expected value (at each row's digit position) against the raters' unrounded mean: a
graded signal, which needs no probe and works with any ``peft`` method.

**Clip-grouped batches** (``group_by_clip``, :class:`ClipGroupedSampler`): the probe taught the encoder
pitch (the probe ranks held-out pitch at ρ ≈ 0.55), yet the language model answered one loudness-like
score whatever dimension the prompt asked (its answers for the four dimensions of a clip correlated at
0.74-0.94; README). Batches that hold one clip asked about every dimension, with different answers,
make answering per clip rather than per question visibly wrong within each step.

The probe is a submodule of the model while it trains (``score_probe``), so the Trainer's optimizer,
gradient clipping and checkpoints (resume included) cover it; it is never published
(:func:`without_probe` around every save of a standalone model). Off by default, and for a pretrained
evaluator, whose encoder needs no such help.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from dramaturg.services.evaluator.model import unwrap
from dramaturg.services.evaluator.scoring import digit_token_ids, score_logits
from dramaturg.shared.data.prosody import f0_track, frame_rms_db, hz_to_st
from torch import nn
from trl import SFTTrainer

PROBE = "score_probe"
"""The probe's attribute on the model while it trains (and its prefix in the Trainer's checkpoints)."""


CONTOUR_CHANNELS = ("voicing", "f0_st", "level_db")
"""What the contour head predicts per audio token (module docstring)."""
FRAMES_PER_TOKEN = 4
"""Qwen2-Audio: a stride-2 convolution then a stride-2 average pool, so one audio token per 4 mel frames."""
F0_SCALE_ST = 6.0  # semitones → about unit scale (speech moves within an octave)
LEVEL_FLOOR_DB = -60.0
LEVEL_SCALE_DB = 20.0


def clip_contour(samples: np.ndarray, sample_rate: int, frames: int) -> np.ndarray:
    """``(frames, 3)`` float32 per 10 ms mel frame: :data:`CONTOUR_CHANNELS`, NaN where undefined.

    Voicing is 1/0 (YIN found an F0 or not); F0 is in semitones from the clip's median voiced F0, over
    :data:`F0_SCALE_ST`, NaN on unvoiced frames; level is the frame's RMS in dB below the clip's loudest
    frame, floored at :data:`LEVEL_FLOOR_DB`, over :data:`LEVEL_SCALE_DB`, shifted to centre on 0. Frames
    past the clip's end are NaN (nothing to learn from padding).
    """
    out = np.full((frames, len(CONTOUR_CHANNELS)), np.nan, dtype=np.float32)
    x = np.asarray(samples, dtype=np.float64)
    if x.size == 0:
        return out
    _, f0 = f0_track(x, sample_rate)
    level = frame_rms_db(x, sample_rate)
    n = min(frames, len(f0), len(level))
    voiced = np.isfinite(f0[:n])
    out[:n, 0] = voiced.astype(np.float32)
    if voiced.any():
        st = np.asarray(hz_to_st(np.where(voiced, f0[:n], 1.0)), dtype=np.float64)
        out[:n, 1] = np.where(voiced, (st - np.median(st[voiced])) / F0_SCALE_ST, np.nan)
    relative = np.maximum(level[:n] - level[:n].max(), LEVEL_FLOOR_DB)
    out[:n, 2] = relative / LEVEL_SCALE_DB + 1.5
    return out


def token_contours(frame_contours: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(clips, frames, 3)`` per-frame contours (NaN = undefined) → per-token means and their mask.

    Token ``i`` covers frames ``4i .. 4i+3`` (:data:`FRAMES_PER_TOKEN`); a token's channel is defined
    when any of its frames is (F0: half of them voiced at least, so a token on a voicing edge is not
    taught a pitch from one frame).
    """
    clips, frames, channels = frame_contours.shape
    tokens = frames // FRAMES_PER_TOKEN
    grouped = frame_contours[:, : tokens * FRAMES_PER_TOKEN]
    grouped = grouped.reshape(clips, tokens, FRAMES_PER_TOKEN, channels)
    finite = torch.isfinite(grouped)
    count = finite.sum(2)
    mean = torch.where(finite, grouped, torch.zeros_like(grouped)).sum(2) / count.clamp_min(1)
    needed = torch.ones(channels, dtype=count.dtype, device=count.device)
    needed[CONTOUR_CHANNELS.index("f0_st")] = FRAMES_PER_TOKEN // 2
    return mean, count >= needed


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
        self.contour = nn.Linear(width, len(CONTOUR_CHANNELS))  # per token (module docstring, "Contours")

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


def digit_positions(labels: torch.Tensor, digit_ids: Sequence[int]) -> torch.Tensor:
    """Each row's first label that is one of ``digit_ids`` (its answer digit): positions (rows,)."""
    is_digit = torch.isin(labels, torch.tensor(list(digit_ids), device=labels.device))
    if not bool(is_digit.any(dim=1).all()):
        raise ValueError("score_weight: a row's answer has no digit token (the completion must be "
                         "<answer>N</answer>)")
    return is_digit.int().argmax(dim=1)


def expected_score_loss(logits: torch.Tensor, reference: torch.Tensor,
                        digit_ids: Sequence[int]) -> torch.Tensor:
    """Squared error of the expected score (1..5 → -1..1) of next-token ``logits`` (rows, vocabulary),
    read where each row's digit is predicted, against ``reference`` (already on the -1..1 scale)."""
    expected = score_logits(logits.float(), list(digit_ids)).score
    return nn.functional.mse_loss(scaled(expected), reference.to(expected.device).float())


class ClipGroupedSampler(torch.utils.data.Sampler[int]):
    """Row indices with each clip's rows (one per dimension) kept together, clips shuffled every epoch.

    A batch then holds the same audio asked about several dimensions with different answers: the
    language model cannot lower the loss by answering one score per clip whatever the question.
    """

    def __init__(self, clip_ids: Sequence[str], seed: int) -> None:
        self.groups: dict[str, list[int]] = {}
        for index, clip in enumerate(clip_ids):
            self.groups.setdefault(str(clip), []).append(index)
        self.seed = int(seed)
        self.epoch = 0

    def __len__(self) -> int:
        return sum(len(rows) for rows in self.groups.values())

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order the next iteration gives (as ``DistributedSampler``: accelerate calls it,
        so a resumed run sees the same order as the run it continues)."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1  # reshuffled next time even when nobody calls set_epoch
        groups = list(self.groups.values())
        for position in torch.randperm(len(groups), generator=generator).tolist():
            yield from groups[position]


class ProbedSFTTrainer(SFTTrainer):
    """TRL's ``SFTTrainer`` plus the training aids' losses (module docstring): ``probe_weight`` × the score
    probe's squared error, ``contour_weight`` × the contour head's, and ``score_weight`` × the squared
    error of the expected score the service would return (the answer digits' probabilities at the digit
    position, renormalised, :func:`~.scoring.score_logits`) against the raters' mean.

    The projected audio tokens and the language model's last hidden states are caught by forward hooks
    during TRL's own forward (no second pass; TRL's fused loss never materialises the logits, so the LM
    head runs again on the digit positions only, as :func:`~.scoring.answer_logits` does at serving
    time); the losses are logged as ``probe_loss``, ``contour_loss`` and ``score_loss`` with TRL's
    metrics.
    """

    def __init__(self, *args: Any, probe_weight: float = 0.0, contour_weight: float = 0.0,
                 score_weight: float = 0.0, group_by_clip: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group_by_clip = bool(group_by_clip)
        self.probe_weight = float(probe_weight)
        self.contour_weight = float(contour_weight)
        self.score_weight = float(score_weight)
        self.digit_ids = list(digit_token_ids(self.processing_class.tokenizer))

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.group_by_clip and dataset is not None:
            return ClipGroupedSampler(dataset["id"], self.args.seed)
        return super()._get_train_sampler(train_dataset)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        index = inputs.pop("probe_index")
        target = inputs.pop("probe_target")
        contours = inputs.pop("contour_target", None)
        core = model.module if hasattr(model, "module") else model  # DDP / accelerate wrappers
        caught: dict[str, torch.Tensor] = {}

        def catch(name: str) -> Any:
            return lambda _module, _args, output: caught.setdefault(name, output)

        probed = self.probe_weight > 0 or self.contour_weight > 0
        base = unwrap(core)
        hooks = []
        if probed:
            hooks.append(base.model.multi_modal_projector.register_forward_hook(catch("tokens")))
        if self.score_weight > 0:
            hooks.append(base.model.language_model.norm.register_forward_hook(catch("hidden")))
        try:  # return_outputs only when asked: TRL recomputes the logits for it with a second forward
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
        finally:
            for hook in hooks:
                hook.remove()
        if probed and "tokens" not in caught:
            raise RuntimeError("the score probe saw no audio tokens: the batch has no input_features")
        mode = "train" if model.training else "eval"
        loss = result[0] if return_outputs else result
        reference = scaled(target.to(loss.device).float())
        if probed:
            tokens = caught["tokens"]
            _, lengths = base.model.audio_tower._get_feat_extract_output_lengths(
                inputs["feature_attention_mask"].sum(-1)
            )
            probe = getattr(base, PROBE)
            if self.probe_weight > 0:
                scores = probe(tokens, lengths)
                predicted = scores.gather(1, index.to(scores.device)[:, None]).squeeze(1)
                probe_loss = nn.functional.mse_loss(predicted.float(), reference)
                self._metrics[mode]["probe_loss"].append(float(probe_loss.detach()))
                loss = loss + self.probe_weight * probe_loss.to(loss.dtype)
            if self.contour_weight > 0:
                if contours is None:
                    raise RuntimeError("contour_weight > 0 but the batch has no contour_target "
                                       "(EvaluatorCollator(contours=True))")
                contour_loss = self.contour_loss(probe, tokens, lengths, contours.to(tokens.device))
                self._metrics[mode]["contour_loss"].append(float(contour_loss.detach()))
                loss = loss + self.contour_weight * contour_loss.to(loss.dtype)
        if self.score_weight > 0:
            labels = inputs["labels"].to(loss.device)
            rows = torch.arange(labels.shape[0], device=labels.device)
            before = digit_positions(labels, self.digit_ids) - 1  # the position that predicts the digit
            logits = base.lm_head(caught["hidden"][rows, before])
            score_loss = expected_score_loss(logits, reference, self.digit_ids)
            self._metrics[mode]["score_loss"].append(float(score_loss.detach()))
            loss = loss + self.score_weight * score_loss.to(loss.dtype)
        return (loss, result[1]) if return_outputs else loss

    @staticmethod
    def contour_loss(probe: ScoreProbe, tokens: torch.Tensor, lengths: torch.Tensor,
                     frame_contours: torch.Tensor) -> torch.Tensor:
        """Mean squared error of the contour head over the defined channels of the valid tokens."""
        target, defined = token_contours(frame_contours.float())
        count = min(tokens.shape[1], target.shape[1])
        predicted = probe.contour(tokens[:, :count]).float()
        target, defined = target[:, :count], defined[:, :count]
        valid = torch.arange(count, device=tokens.device)[None, :] < lengths.to(tokens.device)[:, None]
        mask = (defined & valid[..., None]).float()
        return ((predicted - target) ** 2 * mask).sum() / mask.sum().clamp_min(1.0)
