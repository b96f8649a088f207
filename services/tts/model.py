"""The TTS model: transformers' CSM (a text → Mimi-codec-token model) with its processor and codec.

CSM ("Conversational Speech Model", Sesame) is dual-autoregressive: a Llama-style *backbone* reads the
prompt (text turns ``<bos>[speaker]text<eos>``, optionally followed by their audio as codec frames)
and predicts the first codebook of the next audio frame; a small *depth decoder* then predicts the
frame's remaining codebooks from the backbone's last hidden state. The frames are Mimi codec codes
(12.5 frames a second at 24 kHz) that the model's own ``codec_model`` turns into audio. Everything
is one ``CsmForConditionalGeneration``, so ``save_pretrained`` / ``from_pretrained`` carry the
backbone, the depth decoder and the codec together, and the ``CsmProcessor`` (tokenizer, feature
extractor, chat template) is saved next to it.

Two sizes:

* **production** (:data:`PRODUCTION_PRESET`): ``sesame/csm-1b`` loaded with ``from_pretrained`` — a
  1 B backbone, 32 codebooks of 2,048 codes, the full Mimi codec, the Llama-3 tokenizer. It is a
  gated hub repository (accept its licence, then log in); nothing here downloads it by itself;
* **tiny** (:func:`build_tiny_tts_model`): the same classes built from configs — a 2-layer, 64-wide
  backbone and depth decoder, 8 codebooks of 64 codes, a narrow Mimi with Mimi's own convolution
  layout and sample rate, and a character tokenizer (``tokenizer.py``): about 0.37 M parameters,
  for tests, CPU training checks and a stack that has trained nothing yet (:func:`write_tiny_model`).

The tiny codec keeps 24 kHz and Mimi's layout (``upsampling_ratios [8, 6, 5, 4]``, kernels 7/3/3,
the stride-2 frame-rate conversion) because ``CsmProcessor`` does not ask the codec how many frames
an audio gives: it computes the count from a hard-coded copy of that layout (its
``encoded_length_kwargs``) and the sample rate its feature extractor declares. Another layout or rate
would make the prompt's audio-token count disagree with the frames the codec encodes. Only the
widths shrink. 24 kHz also keeps tiny and production interchangeable for the data preparation and
the service's audio I/O.

Traps of random (untrained) models, handled here:

* Mimi initialises its codebooks (``embed_sum``) to zero, so every code decodes to the same latent
  and a random codec outputs a constant: :func:`randomise_codebooks` fills them.
* CSM's heads cover ``codebook_size + 3`` ids (the last ones are padding / reserved) and an untrained
  head emits them; a code ≥ the codec's codebook size would crash the codec's embedding lookup.
  :func:`sampling_kwargs` suppresses them in both the backbone and the depth decoder.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from dramaturg.services.tts.tokenizer import (
    AUDIO_EOS_TOKEN,
    AUDIO_TOKEN,
    build_tokenizer,
    reset_padding_state,
)
from transformers import (
    AutoProcessor,
    BatchFeature,
    CsmConfig,
    CsmDepthDecoderConfig,
    CsmForConditionalGeneration,
    CsmProcessor,
    EncodecFeatureExtractor,
    LogitsProcessorList,
    MimiConfig,
    MimiModel,
    PreTrainedTokenizerBase,
)
from transformers.generation.streamers import BaseStreamer

log = logging.getLogger(__name__)

SAMPLE_RATE = 24_000  # Mimi's rate, kept by the tiny codec (see the module docstring)
PRODUCTION_MODEL_ID = "sesame/csm-1b"
# LoRA targets: every attention and MLP projection of the backbone and the depth decoder (not the codec,
# which stays frozen, nor the embeddings and heads). A peft ``target_modules`` string is a full-match regex.
LORA_TARGET_MODULES = r".*(backbone_model|depth_decoder)\..*\.(q|k|v|o|gate|up|down)_proj"
CODEBOOK_STD = 0.3  # spread of the random codebooks of a tiny codec
OUTPUT_GAIN = 0.05  # scales a tiny codec's last convolution so its random output stays near [-1, 1]


@dataclass(frozen=True)
class ProductionPreset:
    """What the service runs in production, described (never loaded by the tests)."""

    model_id: str = PRODUCTION_MODEL_ID
    sample_rate: int = SAMPLE_RATE
    frame_rate: float = 12.5
    num_codebooks: int = 32
    codebook_size: int = 2048
    backbone: str = "Llama-3.2-1B-style, 16 layers, hidden 2048"
    depth_decoder: str = "4 layers, hidden 1024"
    tokenizer: str = "Llama-3 (128,256 entries)"
    gated: bool = True  # hub licence acceptance + login needed before the first download
    note: str = "load with load_tts_model(PRODUCTION_MODEL_ID) on a machine that can reach the hub"


PRODUCTION_PRESET = ProductionPreset()

# The prompt layout of CSM: per turn ``<bos>[speaker]text<eos>``, then, for a turn that has audio,
# ``<|AUDIO|>`` (expanded by the processor to one token per codec frame) and ``<|audio_eos|>`` (an
# all-``codebook_eos`` frame). A turn without audio can only be the last one: the one to speak.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- set role = message['role'] | string -%}"
    "{%- if not role.isdigit() -%}"
    "{{- raise_exception('a message role is the speaker id, a non-negative integer, e.g. \"0\"') -}}"
    "{%- endif -%}"
    "{%- set items = message['content'] -%}"
    "{%- if items is string -%}{%- set items = [{'type': 'text', 'text': items}] -%}{%- endif -%}"
    "{{- bos_token + '[' + role + ']' -}}"
    "{%- for item in items if item['type'] == 'text' -%}{{- item['text'] -}}{%- endfor -%}"
    "{{- eos_token -}}"
    "{%- for item in items if item['type'] == 'audio' -%}"
    "{{- '" + AUDIO_TOKEN + AUDIO_EOS_TOKEN + "' -}}"
    "{%- endfor -%}"
    "{%- endfor -%}"
)


# ------------------------------------------------------------------------------------------- configs


def tiny_mimi_config(
    *,
    codebook_size: int = 64,
    num_codebooks: int = 8,
    hidden_size: int = 32,
    num_filters: int = 4,
    num_hidden_layers: int = 2,
    **overrides: Any,
) -> MimiConfig:
    """A narrow Mimi with Mimi's convolution layout and 24 kHz (see the module docstring for why).

    ``upsample_groups`` follows ``hidden_size`` (Mimi's frame-rate upsampling is depthwise) and the
    quantizer works in ``hidden_size // 2`` dimensions.
    """
    fields: dict[str, Any] = {
        "sampling_rate": SAMPLE_RATE,
        "hidden_size": hidden_size,
        "num_filters": num_filters,
        "codebook_size": codebook_size,
        "codebook_dim": hidden_size // 2,
        "vector_quantization_hidden_dimension": hidden_size // 2,
        "num_quantizers": num_codebooks,
        "num_semantic_quantizers": 1,
        "upsample_groups": hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "intermediate_size": 2 * hidden_size,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
    }
    fields.update(overrides)
    return MimiConfig(**fields)


def tiny_csm_config(
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    codec_config: MimiConfig | None = None,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    depth_hidden_size: int = 64,
    depth_num_hidden_layers: int = 2,
    max_position_embeddings: int = 2048,
    **overrides: Any,
) -> CsmConfig:
    """A small CSM whose codebooks, special ids and text vocabulary match the codec and the tokenizer.

    The codebook count and size come from ``codec_config`` (default :func:`tiny_mimi_config`), so the
    two cannot disagree: ``vocab_size`` is the codebook size + 3 like csm-1b's 2,051 (code 0 doubles as
    the end-of-audio code, the last id pads). The codec config is always passed: without one, CSM
    builds a full-size Mimi (about 80 M parameters) inside the tiny model.
    """
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    codec_config = codec_config if codec_config is not None else tiny_mimi_config()
    num_codebooks = int(codec_config.num_quantizers)
    vocab_size = int(codec_config.codebook_size) + 3
    depth = CsmDepthDecoderConfig(
        num_codebooks=num_codebooks,
        backbone_hidden_size=hidden_size,
        vocab_size=vocab_size,
        hidden_size=depth_hidden_size,
        intermediate_size=2 * depth_hidden_size,
        num_hidden_layers=depth_num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=num_codebooks + 1,
    )
    fields: dict[str, Any] = {
        "num_codebooks": num_codebooks,
        "vocab_size": vocab_size,
        "text_vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": max_position_embeddings,
        "bos_token_id": tokenizer.bos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": None,  # CSM stops on an all-eos codec frame, not on a text token
        "codebook_eos_token_id": 0,
        "codebook_pad_token_id": vocab_size - 1,
        "audio_token_id": tokenizer.convert_tokens_to_ids(AUDIO_TOKEN),
        "audio_eos_token_id": tokenizer.convert_tokens_to_ids(AUDIO_EOS_TOKEN),
        "depth_decoder_config": depth.to_dict(),
        "codec_config": codec_config.to_dict(),
    }
    fields.update(overrides)
    return CsmConfig(**fields)


def build_processor(
    tokenizer: PreTrainedTokenizerBase | None = None, *, sample_rate: int = SAMPLE_RATE
) -> CsmProcessor:
    """The processor: tokenizer, Mimi's feature extractor (Encodec's, mono) and CSM's chat template."""
    feature_extractor = EncodecFeatureExtractor(feature_size=1, sampling_rate=sample_rate, padding_value=0.0)
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    return CsmProcessor(feature_extractor, tokenizer, chat_template=CHAT_TEMPLATE)


# ------------------------------------------------------------------------------------------- models


@torch.no_grad()
def randomise_codebooks(
    codec: MimiModel, *, std: float = CODEBOOK_STD, generator: torch.Generator | None = None
) -> None:
    """Give an untrained Mimi distinct code vectors (it starts with all-zero codebooks).

    The centroid a code decodes to is ``embed_sum / cluster_usage``; ``cluster_usage`` stays 1. The
    codebook caches its centroids on first use (``_embed``), so the cache is cleared too.
    """
    for module in codec.quantizer.modules():
        if hasattr(module, "embed_sum") and hasattr(module, "cluster_usage"):
            noise = torch.randn(module.embed_sum.shape, generator=generator, dtype=torch.float32)
            module.embed_sum.copy_(noise.to(module.embed_sum) * std * module.cluster_usage[:, None])
            module._embed = None


@torch.no_grad()
def tame_output_level(codec: MimiModel, gain: float = OUTPUT_GAIN) -> None:
    """Scale the decoder's last convolution: a random codec otherwise peaks around ±8, past full scale."""
    last = codec.decoder.decoder_seanet.layers[-1].conv
    last.weight.mul_(gain)
    if last.bias is not None:
        last.bias.mul_(gain)


def build_tiny_tts_model(
    *, seed: int | None = 0, **config_overrides: Any
) -> tuple[CsmForConditionalGeneration, CsmProcessor]:
    """A random tiny CSM (with its codec) and its processor; the same weights for the same seed.

    ``config_overrides`` go to :func:`tiny_csm_config`. The RNG is forked, so building does not move
    the caller's global torch seed.
    """
    processor = build_processor()
    config = tiny_csm_config(processor.tokenizer, **config_overrides)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(int(seed))
        model = CsmForConditionalGeneration(config)
        generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        randomise_codebooks(model.codec_model, generator=generator)
        tame_output_level(model.codec_model)
    model.eval()
    log.debug("tiny CSM: %d parameters", sum(p.numel() for p in model.parameters()))
    return model, processor


def save_tts_model(model: CsmForConditionalGeneration, processor: CsmProcessor, folder: str | Path) -> Path:
    """``save_pretrained`` the model (backbone, depth decoder, codec) and the processor into ``folder``.

    The tokenizer's padding state is cleared first (see ``tokenizer.reset_padding_state``).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    reset_padding_state(processor.tokenizer)
    processor.save_pretrained(str(folder))
    return folder


def load_tts_model(
    source: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **from_pretrained_kwargs: Any,
) -> tuple[CsmForConditionalGeneration, CsmProcessor]:
    """Model and processor from a folder :func:`save_tts_model` wrote, or a hub id such as csm-1b.

    Both go through transformers' ``from_pretrained`` (``AutoProcessor`` finds ``CsmProcessor`` from
    the saved ``processor_config.json``); the model comes back in eval mode.
    """
    kwargs = dict(from_pretrained_kwargs)
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = CsmForConditionalGeneration.from_pretrained(str(source), **kwargs)
    processor = AutoProcessor.from_pretrained(str(source))
    if device is not None:
        model.to(device)
    model.eval()
    return model, processor


def write_tiny_model(folder: Path, home: Path | None = None, *, seed: int = 0) -> None:
    """An untrained tiny CSM + processor in ``folder`` (``save_pretrained``), the same for the same seed.

    The signature is the registry's ``ServiceEntry.tiny_model`` writer (``home`` is unused here, as in
    the speaker service's).
    """
    model, processor = build_tiny_tts_model(seed=seed)
    save_tts_model(model, processor, folder)


# ------------------------------------------------------------------------------------------- inference


def suppressed_codes(model: CsmForConditionalGeneration) -> list[int]:
    """Head ids the codec cannot decode: every id from the codec's codebook size to the head's size."""
    codebook_size = int(model.config.codec_config.codebook_size)
    return list(range(codebook_size, int(model.config.vocab_size)))


def sampling_kwargs(
    model: CsmForConditionalGeneration,
    *,
    temperature: float = 0.9,
    top_p: float | None = None,
    top_k: int | None = None,
) -> dict[str, Any]:
    """``generate`` keyword arguments for the backbone and (``depth_decoder_*``) the depth decoder.

    Both get the same sampling settings and the same suppressed ids. Every depth-decoder setting is
    passed on each call because CSM's ``generate`` writes them into the depth decoder's generation
    config, where they would otherwise outlive the call. ``temperature <= 0`` means greedy.
    """
    if temperature > 0:
        settings: dict[str, Any] = {
            "do_sample": True,
            "temperature": float(temperature),
            "top_p": top_p,
            "top_k": top_k,
        }
    else:
        settings = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    settings["suppress_tokens"] = suppressed_codes(model)
    out = dict(settings)
    out.update({f"depth_decoder_{key}": value for key, value in settings.items()})
    return out


Turn = tuple[int, str, np.ndarray]  # (speaker, text, audio at the processor's sample rate)


def conversation(text: str, speaker: int = 0, context: Sequence[Turn] = ()) -> list[dict[str, Any]]:
    """CSM's chat format: earlier turns with their audio (the voice prompt), then the turn to speak."""
    messages = [
        {
            "role": str(int(turn_speaker)),
            "content": [
                {"type": "text", "text": turn_text},
                {"type": "audio", "audio": np.asarray(turn_audio, dtype=np.float32)},
            ],
        }
        for turn_speaker, turn_text, turn_audio in context
    ]
    messages.append({"role": str(int(speaker)), "content": [{"type": "text", "text": text}]})
    return messages


def prompt_inputs(
    processor: CsmProcessor, text: str, speaker: int = 0, context: Sequence[Turn] = ()
) -> BatchFeature:
    """The tensors ``generate`` takes for one utterance (and its optional context turns)."""
    return processor.apply_chat_template(
        conversation(text, speaker, context), tokenize=True, return_dict=True, return_tensors="pt"
    )


def training_inputs(
    processor: CsmProcessor,
    text: str,
    audio: np.ndarray,
    speaker: int = 0,
    *,
    depth_decoder_ratio: float = 1.0,
) -> BatchFeature:
    """One (text, audio) pair as a training example: ``input_ids``, ``input_values``, ``labels``, …

    ``labels`` mark the audio frames (and the audio end) the loss is taken on; the model encodes the
    audio into codes itself. ``depth_decoder_ratio`` is the share of frames the depth decoder trains
    on (csm-1b was trained on 1/16 of them to save compute; 1.0 = all).
    """
    messages = [
        {
            "role": str(int(speaker)),
            "content": [
                {"type": "text", "text": text},
                {"type": "audio", "audio": np.asarray(audio, dtype=np.float32)},
            ],
        }
    ]
    return processor.apply_chat_template(
        messages,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"output_labels": True, "depth_decoder_labels_ratio": depth_decoder_ratio},
    )


def _rng_devices(model: torch.nn.Module) -> list[int]:
    device = next(model.parameters()).device
    return [device.index or 0] if device.type == "cuda" else []


@torch.no_grad()
def synthesize(
    model: CsmForConditionalGeneration,
    processor: CsmProcessor,
    text: str,
    speaker: int = 0,
    *,
    context: Sequence[Turn] = (),
    max_new_frames: int = 125,
    seed: int | None = None,
    temperature: float = 0.9,
    top_p: float | None = None,
    top_k: int | None = None,
    streamer: BaseStreamer | None = None,
    logits_processor: LogitsProcessorList | None = None,
) -> tuple[np.ndarray, int]:
    """Speak ``text`` as ``speaker``: float32 mono samples and their sample rate.

    Calls the model's own ``generate(..., output_audio=True)``, which stops at an all-eos frame or
    after ``max_new_frames`` frames (12.5 a second: 125 = 10 s) and decodes with the model's codec.
    ``seed`` makes the sampling reproducible without touching the caller's global RNG state.
    ``streamer`` (e.g. ``codec_stream.CsmAudioStreamer``) receives the frames as they are sampled.
    ``logits_processor`` runs once per generated frame: the server's deadline / cancel check lives there,
    because CSM's ``generate`` ignores custom ``StoppingCriteria`` (it keeps only its max-length one).
    """
    device = next(model.parameters()).device
    inputs = prompt_inputs(processor, text, speaker, context).to(device)
    kwargs = sampling_kwargs(model, temperature=temperature, top_p=top_p, top_k=top_k)
    with torch.random.fork_rng(devices=_rng_devices(model), enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(int(seed))
        audio = model.generate(
            **inputs,
            max_new_tokens=int(max_new_frames),
            output_audio=True,
            streamer=streamer,
            logits_processor=logits_processor,
            **kwargs,
        )
    samples = audio[0].float().cpu().numpy().astype(np.float32, copy=False)
    return samples, int(model.config.codec_config.sampling_rate)


def parameter_count(model: torch.nn.Module, prefixes: Mapping[str, str] | None = None) -> dict[str, int]:
    """Parameters per part (backbone, depth decoder, codec, text embeddings + head) and in total."""
    prefixes = prefixes or {
        "backbone": "backbone_model.",
        "depth_decoder": "depth_decoder.",
        "codec": "codec_model.",
    }
    counts = dict.fromkeys(prefixes, 0) | {"other": 0, "total": 0}
    for name, param in model.named_parameters():
        part = next((key for key, prefix in prefixes.items() if name.startswith(prefix)), "other")
        counts[part] += param.numel()
        counts["total"] += param.numel()
    return counts
