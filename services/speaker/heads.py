"""Training heads: what turns speaker embeddings into a loss — the four objectives of "Fine-tuning
wav2vec2 for speaker recognition" (Vaessen & van Leeuwen, ICASSP 2022).

* ``ce`` — a linear layer over the training speakers and cross-entropy.
* ``aam`` — speechbrain's cosine classifier and ``LogSoftmaxWrapper(AdditiveAngularMargin(m, s))``
  (m = 0.2, s = 30 in that paper), with an optional linear margin warm-up.
* ``bce`` — pairs of utterances: their cosine, a learnable affine map, ``BCEWithLogitsLoss``.
* ``ctc`` — wav2vec2 frames → speaker-token posteriors (blank = 0), ``torch.nn.CTCLoss`` with a
  single-token target per utterance, as in that paper.

Heads live only in training: the published model is the encoder alone, so serving never carries
a classifier over speakers it will not see again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from dramaturg.shared.voice.encoder import SpeakerEncoder
from speechbrain.lobes.models.ECAPA_TDNN import Classifier as CosineClassifier
from speechbrain.nnet.losses import AdditiveAngularMargin, LogSoftmaxWrapper
from torch import nn

HEADS = ("ce", "aam", "bce", "ctc")
PAIR_HEADS = ("bce",)  # trained on pairs (data.PairDataset) rather than labelled utterances


class CrossEntropyHead(nn.Module):
    """Softmax over the training speakers."""

    def __init__(self, embedding_size: int, num_speakers: int) -> None:
        super().__init__()
        self.linear = nn.Linear(embedding_size, num_speakers)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.linear(embeddings), labels)


class AAMSoftmaxHead(nn.Module):
    """Additive angular margin softmax, all of it speechbrain's (classifier, margin, loss)."""

    def __init__(
        self, embedding_size: int, num_speakers: int, margin: float = 0.2, scale: float = 30.0
    ) -> None:
        super().__init__()
        self.classifier = CosineClassifier(embedding_size, lin_blocks=0, out_neurons=num_speakers)
        self.scale = scale
        self.margin = margin
        self.loss = LogSoftmaxWrapper(AdditiveAngularMargin(margin=margin, scale=scale))

    def set_margin(self, margin: float) -> None:
        """Change the margin (warm-up). speechbrain precomputes cos/sin of it, so the margin is rebuilt."""
        if margin != self.margin:
            self.margin = margin
            self.loss.loss_fn = AdditiveAngularMargin(margin=margin, scale=self.scale)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cosines = self.classifier(embeddings.unsqueeze(1))  # (B, 1, speakers)
        return self.loss(cosines, labels.unsqueeze(1))


class PairwiseBCEHead(nn.Module):
    """Same-speaker probability of a pair from its cosine: sigmoid(w · cos + b)."""

    def __init__(self, init_weight: float = 10.0, init_bias: float = -5.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(float(init_weight)))
        self.bias = nn.Parameter(torch.tensor(float(init_bias)))
        self.loss = nn.BCEWithLogitsLoss()

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        first, second = embeddings.chunk(2, dim=0)  # the pair collator stacks all a's, then all b's
        cosine = F.cosine_similarity(first, second, dim=-1)
        return self.loss(self.weight * cosine + self.bias, labels.float())


class CTCHead(nn.Module):
    """Frame-level posteriors over (blank, speaker 1 … N); the target is one speaker token."""

    def __init__(self, frame_size: int, num_speakers: int) -> None:
        super().__init__()
        self.linear = nn.Linear(frame_size, num_speakers + 1)
        self.loss = nn.CTCLoss(blank=0, zero_infinity=True)

    def forward(self, frames: torch.Tensor, frame_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        log_probs = F.log_softmax(self.linear(frames).float(), dim=-1).transpose(0, 1)  # (T, B, C)
        targets = (labels + 1).unsqueeze(1)
        input_lengths = frame_mask.sum(dim=1)
        target_lengths = torch.ones_like(labels)
        return self.loss(log_probs, targets, input_lengths, target_lengths)


def build_head(
    kind: str, encoder: SpeakerEncoder, num_speakers: int, *, margin: float = 0.2, scale: float = 30.0
) -> nn.Module:
    """The head ``kind`` for ``encoder``; ValueError for combinations that make no sense."""
    if kind == "ce":
        return CrossEntropyHead(encoder.embedding_size, num_speakers)
    if kind == "aam":
        return AAMSoftmaxHead(encoder.embedding_size, num_speakers, margin=margin, scale=scale)
    if kind == "bce":
        return PairwiseBCEHead()
    if kind == "ctc":
        if encoder.config.architecture != "wav2vec2":
            raise ValueError(
                f"the ctc head reads wav2vec2 frames; use ce, aam or bce for {encoder.config.architecture}"
            )
        return CTCHead(encoder.frame_size, num_speakers)
    raise ValueError(f"head {kind!r}: expected one of {', '.join(HEADS)}")


class SpeakerTrainingModel(nn.Module):
    """Encoder + head, with the ``forward(**batch) -> {"loss": …}`` the transformers Trainer expects.

    Not a ``PreTrainedModel``: the Trainer then checkpoints its whole state dict (head included)
    for resuming, while the model we publish is ``encoder.save_pretrained`` alone.
    """

    def __init__(self, encoder: SpeakerEncoder, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(
        self, input_values: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        if isinstance(self.head, CTCHead):
            frames, mask = self.encoder.frames(input_values, lengths=lengths)
            loss = self.head(frames, mask, labels)
        else:
            loss = self.head(self.encoder(input_values, lengths=lengths), labels)
        return {"loss": loss}
