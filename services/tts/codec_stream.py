"""Stream Mimi codec frames into audio, chunk by chunk, with the samples a whole decode gives.

``MimiModel.decode`` only streams its transformer (``decoder_past_key_values``): the convolutions
around it start from zero padding on every call, and a transposed convolution's output runs past the
end of its input by ``kernel - stride`` samples that the next call never sees. Decoding a long
utterance frame group by frame group with it therefore clicks at every boundary (the tests measure
the difference). :class:`StreamingMimiDecoder` keeps the three kinds of state a causal Mimi decoder
needs so that the concatenated chunks equal the whole decode up to float rounding:

* causal ``MimiConv1d``: the last ``padding_total`` input samples (its left context), which a whole
  decode would have seen instead of the zero (or replicated) padding;
* causal ``MimiConvTranspose1d``: the ``kernel - stride`` overhanging output samples (bias removed,
  since the next chunk's output carries the bias again), added onto the next chunk (overlap-add);
* the decoder transformer: a KV cache and the absolute positions of the new frames (rotary
  embeddings and the sliding-window mask depend on them).

:class:`CsmAudioStreamer` plugs it into ``CsmForConditionalGeneration.generate(streamer=...)``: CSM's
sampling loop calls ``streamer.put`` once with the prompt and then once per generated frame with a
``(batch, num_codebooks)`` tensor of codes, and ``end()`` when it stops.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache
from transformers.generation.streamers import BaseStreamer
from transformers.models.mimi.modeling_mimi import (
    MimiConv1d,
    MimiConvTranspose1d,
    MimiDecoderModel,
    MimiModel,
    MimiResnetBlock,
)

log = logging.getLogger(__name__)

AudioCallback = Callable[[int, np.ndarray], None]


class StreamingMimiDecoder:
    """Decode ``(batch, num_codebooks, frames)`` Mimi codes in successive chunks of any size ≥ 1 frame.

    ``decode(chunk)`` returns the ``(batch, channels, frames * frame_size)`` samples that belong to the
    chunk's frames; concatenating the outputs of all chunks gives ``MimiModel.decode`` of the whole
    sequence. One instance follows one stream (one batch of streams): call :meth:`reset` before the next.
    """

    def __init__(self, codec: MimiModel) -> None:
        if codec.decoder is None:
            raise ValueError("the codec has no decoder (decoder_config=None)")
        self.codec = codec
        self.decoder: MimiDecoderModel = codec.decoder
        self._check_causal()
        self.frame_size = int(codec.config.frame_size)
        self.reset()

    def _check_causal(self) -> None:
        """Only a causal decoder streams exactly; refuse any other layout instead of drifting quietly."""
        for name, module in self.decoder.named_modules():
            if isinstance(module, MimiConv1d) and (not module.causal or int(module.stride) != 1):
                raise ValueError(f"{name}: streaming needs causal stride-1 convolutions in the decoder")
            if isinstance(module, MimiConvTranspose1d) and (not module.causal or module.padding_left != 0):
                raise ValueError(
                    f"{name}: streaming needs causal transposed convolutions (trim_right_ratio 1)"
                )

    def reset(self) -> None:
        """Forget the stream: the next chunk is the first frame group of a new utterance."""
        self._context: dict[int, torch.Tensor] = {}  # id(MimiConv1d) -> left context
        self._tails: dict[int, torch.Tensor] = {}  # id(MimiConvTranspose1d) -> overhang
        self._cache = DynamicCache(config=self.decoder.decoder_transformer.config)
        self._position = 0  # transformer positions consumed so far
        self.frames_decoded = 0

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """The audio of the next ``codes`` frames, ``(batch, channels, frames * frame_size)``."""
        if codes.ndim != 3 or codes.shape[-1] < 1:
            raise ValueError(f"codes must be (batch, num_codebooks, frames ≥ 1), got {tuple(codes.shape)}")
        hidden = self.codec.quantizer.decode(codes.to(self.codec.device))
        if self.decoder.upsample is not None:
            hidden = self._conv_transpose(self.decoder.upsample, hidden)
        hidden = self._transformer(hidden)
        audio = self._run(self.decoder.decoder_seanet, hidden)
        self.frames_decoded += int(codes.shape[-1])
        return audio

    # ------------------------------------------------------------------------------------- layers

    def _transformer(self, hidden: torch.Tensor) -> torch.Tensor:
        steps = hidden.shape[-1]
        positions = torch.arange(self._position, self._position + steps, device=hidden.device)[None]
        out = self.decoder.decoder_transformer(
            hidden.transpose(1, 2), past_key_values=self._cache, use_cache=True, position_ids=positions
        )
        self._position += steps
        return out.last_hidden_state.transpose(1, 2)

    def _run(self, module: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """One decoder module, stateful where it has to be (a mirror of the modules' own forward)."""
        if isinstance(module, MimiConv1d):
            return self._conv(module, hidden)
        if isinstance(module, MimiConvTranspose1d):
            return self._conv_transpose(module, hidden)
        if isinstance(module, MimiResnetBlock):
            residual = self._run(module.shortcut, hidden)
            for layer in module.block:
                hidden = self._run(layer, hidden)
            return residual + hidden
        if hasattr(module, "layers") and isinstance(module.layers, nn.ModuleList):  # the SEANet decoder
            for layer in module.layers:
                hidden = self._run(layer, hidden)
            return hidden
        return module(hidden)  # pointwise: ELU, Identity

    def _conv(self, module: MimiConv1d, hidden: torch.Tensor) -> torch.Tensor:
        """Causal stride-1 convolution with the previous chunk's last inputs as its left padding."""
        pad = int(module.padding_total)
        if pad == 0:
            return module.conv(hidden)
        context = self._context.get(id(module))
        if context is None:  # first chunk: the padding a whole decode uses
            if module.pad_mode == "replicate":
                context = hidden[..., :1].expand(-1, -1, pad)
            else:
                context = hidden.new_zeros(hidden.shape[0], hidden.shape[1], pad)
        padded = torch.cat([context, hidden], dim=-1)
        self._context[id(module)] = padded[..., -pad:]
        return module.conv(padded)

    def _conv_transpose(self, module: MimiConvTranspose1d, hidden: torch.Tensor) -> torch.Tensor:
        """Causal transposed convolution, overlap-adding the previous chunk's overhang."""
        out = module.conv(hidden)
        length = hidden.shape[-1] * module.conv.stride[0]
        tail = self._tails.get(id(module))
        if tail is not None:
            out = torch.cat([out[..., : tail.shape[-1]] + tail, out[..., tail.shape[-1] :]], dim=-1)
        overhang = out[..., length:]
        if module.conv.bias is not None:
            overhang = overhang - module.conv.bias[None, :, None]
        self._tails[id(module)] = overhang
        return out[..., :length]


class CsmAudioStreamer(BaseStreamer):
    """A ``generate(streamer=...)`` streamer that turns the frames CSM samples into audio chunks.

    CSM's ``generate`` first ``put``s the prompt (skipped here), then one ``(batch, num_codebooks)``
    frame per step. Frames are gathered per batch row and decoded every ``chunk_frames`` frames with
    a :class:`StreamingMimiDecoder` per row; ``end()`` flushes what is left. A row stops at its first
    frame whose codes all equal ``eos_code`` (the rule ``generate(output_audio=True)`` cuts the audio
    with), so the streamed audio of a row equals the audio ``generate`` returns for it.

    Each chunk goes to ``on_audio(row, samples)`` when given, is kept for :meth:`audio`, and is put on
    a queue that :meth:`__iter__` drains, so a server can run ``generate`` in a worker thread and send
    chunks as they come (``(row, float32 samples)`` pairs; the iteration ends after ``end()``).
    """

    def __init__(
        self,
        codec: MimiModel,
        *,
        eos_code: int | None = 0,
        chunk_frames: int = 1,
        on_audio: AudioCallback | None = None,
        timeout: float | None = None,
    ) -> None:
        if chunk_frames < 1:
            raise ValueError("chunk_frames must be at least 1")
        self.codec = codec
        self.eos_code = eos_code
        self.chunk_frames = chunk_frames
        self.on_audio = on_audio
        self.timeout = timeout
        self.sample_rate = int(codec.config.sampling_rate)
        self._queue: queue.Queue[tuple[int, np.ndarray] | None] = queue.Queue()
        self._prompt_seen = False
        self._decoders: list[StreamingMimiDecoder] = []
        self._pending: list[list[torch.Tensor]] = []
        self._finished: list[bool] = []
        self.chunks: list[list[np.ndarray]] = []
        self.ended = False

    @classmethod
    def for_model(cls, model: Any, **kwargs: Any) -> CsmAudioStreamer:
        """A streamer over ``model.codec_model`` with the model's codebook end-of-stream code."""
        kwargs.setdefault("eos_code", model.config.codebook_eos_token_id)
        return cls(model.codec_model, **kwargs)

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() hands the prompt over first
            self._prompt_seen = True
            return
        frames = value.reshape(value.shape[0], -1) if value.ndim != 2 else value
        while len(self._decoders) < frames.shape[0]:
            self._decoders.append(StreamingMimiDecoder(self.codec))
            self._pending.append([])
            self._finished.append(False)
            self.chunks.append([])
        for row, frame in enumerate(frames):
            if self._finished[row]:
                continue
            if self.eos_code is not None and bool((frame == self.eos_code).all()):
                self._finished[row] = True
                self._flush(row)
                continue
            self._pending[row].append(frame)
            if len(self._pending[row]) >= self.chunk_frames:
                self._flush(row)

    def end(self) -> None:
        for row in range(len(self._decoders)):
            self._flush(row)
        self.ended = True
        self._queue.put(None)

    def _flush(self, row: int) -> None:
        if not self._pending[row]:
            return
        codes = torch.stack(self._pending[row], dim=-1)[None]  # (1, K, frames)
        self._pending[row] = []
        samples = self._decoders[row].decode(codes)[0, 0].float().cpu().numpy()
        self.chunks[row].append(samples)
        if self.on_audio is not None:
            self.on_audio(row, samples)
        self._queue.put((row, samples))

    def audio(self, row: int = 0) -> np.ndarray:
        """Everything streamed so far for ``row``, concatenated (float32)."""
        if row >= len(self.chunks) or not self.chunks[row]:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(self.chunks[row]).astype(np.float32, copy=False)

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        while True:
            item = self._queue.get(timeout=self.timeout)
            if item is None:
                return
            yield item
