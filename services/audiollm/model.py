"""The audio LLM: SALMONN-lite — Whisper + BEATs → window-level Q-Former → projection → Llama.

SALMONN ("Speech Audio Language Music Open Neural Network", Tang et al., ICLR 2024) reads audio with
two frozen encoders, Whisper's (speech) and BEATs (sounds, music), concatenates their ~50 Hz frames,
lets a window-level Q-Former turn every ~0.33 s into ``N`` tokens, projects them to the LLM's width
and splices them into a text prompt at ``<SpeechHere>`` (``prompt.py``). Trained: the Q-Former (with
its layer norms and queries), the projection and LoRA adapters of the LLM's attention; frozen:
Whisper, BEATs and the LLM's own weights (the config's ``freeze_*`` switches).

Everything is one :class:`AudioLlmForConditionalGeneration` (a ``PreTrainedModel``) with an
:class:`AudioLlmConfig` that holds the sub-configs, so ``save_pretrained`` / ``from_pretrained``
carry the two encoders, the Q-Former and the LLM in one folder, with the processor
(``AudioLlmProcessor``: Whisper's feature extractor and the tokenizer) saved beside it.
``generate`` is the LLM's own ``generate`` (KV cache, streamers, every decoding strategy) on the
prompt's embeddings with the audio spliced in.

Two sizes:

* **production** (:data:`PRODUCTION_PRESET`): ``openai/whisper-large-v3``'s encoder, BEATs_iter3+
  (AS2M, fine-tuned, cpt2) and ``meta-llama/Llama-3.2-3B-Instruct``, assembled by
  :func:`assemble_from_pretrained` from the hub (gated Llama: licence + login; the BEATs checkpoint
  is a file from Microsoft's unilm release). Never loaded by the tests; the assembly itself is
  tested on tiny local checkpoints.
* **tiny** (:func:`build_tiny_audiollm`): the same classes from configs — 2-layer, 64-wide
  Whisper encoder (5 s windows), BEATs, Q-Former and Llama, and a 1,024-entry byte-level BPE
  (``tokenizer.py``); about 0.5 M parameters, for tests, CPU training checks and a stack that has
  trained nothing yet (:func:`write_tiny_model`).

Traps handled here:

* ``peft``'s ``"all-linear"`` (or a bare ``.*(q|k|v)_proj`` regex) also adapts Whisper's and BEATs'
  attention (both have ``q_proj``/``k_proj``/``v_proj``): :data:`LORA_TARGET_MODULES` is anchored
  at ``language_model.``.
* BEATs shares one relative-position-bias table between all its layers; undeclared, ``save_pretrained``
  refuses the shared tensor (:meth:`AudioLlmForConditionalGeneration.get_expanded_tied_weights_keys`
  and ``_tied_weights_keys`` declare it; a reload keeps it shared).
* ``from_pretrained`` gives back parameters that all require grad: the frozen encoders would train,
  and ATen's matmul takes another path for a weight that requires grad, so even the outputs differed
  in the last bits from the saved model's. :meth:`~AudioLlmForConditionalGeneration.from_pretrained`
  re-applies the ``freeze_*`` switches; the round trip is then bit-exact.
* ``model.train()`` would put the frozen encoders' dropout back on; :meth:`train` keeps them in
  eval mode, as SALMONN meant to (its model called ``.eval()`` on them once; its runner's
  ``model.train()`` undid that).
* A frozen encoder runs under ``no_grad``: no activations are kept for it.
* BEATs computes its Kaldi fbank in float32 inside speechbrain: loaded with ``dtype=torch.bfloat16``
  everything else is bfloat16 and BEATs stays float32 (``_keep_in_fp32_modules_strict``); a plain
  ``model.to(torch.bfloat16)`` would break it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from dramaturg.services.audiollm.encoders import (
    ConfiguredBEATs,
    beats_chunk_features,
    chunk_lengths,
    chunk_samples,
    load_beats_checkpoint,
    read_beats_checkpoint,
    split_chunks,
    tiny_beats_config,
    tiny_whisper_config,
    valid_frames,
)
from dramaturg.services.audiollm.prompt import (
    AUDIO_PLACEHOLDER,
    IGNORE_INDEX,
    PROMPT_TEMPLATE,
    AudioLlmProcessor,
)
from dramaturg.services.audiollm.qformer import WindowQFormer, tiny_qformer_config
from dramaturg.services.audiollm.tokenizer import (
    AUDIO_TOKEN,
    BOS,
    EOS,
    PAD,
    SPECIAL_TOKENS,
    VOCAB_SIZE,
    build_tokenizer,
    reset_padding_state,
)
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoProcessor,
    AutoTokenizer,
    Blip2QFormerConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperModel,
)
from transformers import initialization as hf_init
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.whisper.modeling_whisper import WhisperEncoder

log = logging.getLogger(__name__)

MODEL_TYPE = "dramaturg-audiollm"
# LoRA targets: the attention projections of the LLM's decoder layers only. A peft ``target_modules``
# string is a full-match regex over module names; anchoring it at ``language_model.`` keeps Whisper's and
# BEATs' q/k/v projections (same leaf names) out, which "all-linear" would not.
LORA_TARGET_MODULES = r"language_model\.model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj"
# What training updates besides LoRA (peft ``modules_to_save``: saved with the adapter).
TRAINABLE_MODULES: tuple[str, ...] = ("speech_qformer", "speech_projection")
# What a recipe's ``unfreeze`` may train in full besides (attribute names; ``freeze_<name>`` switches).
UNFREEZABLE: tuple[str, ...] = ("whisper", "beats", "language_model")
# What an auxiliary CTC head spells (``AudioLlmConfig.ctc_weight``): a transcript lower-cased, other
# characters dropped, runs of spaces as one.
CTC_ALPHABET = " 'abcdefghijklmnopqrstuvwxyz"
WINDOW_FRAMES = 17  # round(1500 × 0.333333 / 30): SALMONN's second_per_window at 50 frames a second


@dataclass(frozen=True)
class ProductionPreset:
    """What the service runs in production, described (never loaded by the tests)."""

    whisper: str = "openai/whisper-large-v3"  # encoder only: 32 layers, d_model 1280, 128 mels, 30 s windows
    beats_checkpoint: str = "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt"  # unilm/beats release, 768-wide
    language_model: str = "meta-llama/Llama-3.2-3B-Instruct"  # 28 layers, hidden 3072, Llama-3 tokenizer
    audio_token: str = "<|reserved_special_token_0|>"  # an existing Llama-3 id: no embedding resize
    qformer: str = "BERT-base shape: 2 layers, hidden 768, 12 heads, cross-attention every layer"
    encoder_hidden_size: int = 1280 + 768
    num_queries: int = 1
    window: int = WINDOW_FRAMES
    stride: int = WINDOW_FRAMES
    lora_rank: int = 8  # SALMONN's LoRA: r 8, alpha 32, dropout 0.1
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    gated: bool = True  # Llama: licence acceptance + login before the first download
    note: str = "assemble_from_pretrained(beats_checkpoint=...) on a machine that can reach the hub"


PRODUCTION_PRESET = ProductionPreset()


def production_qformer_config(
    encoder_hidden_size: int = PRODUCTION_PRESET.encoder_hidden_size,
) -> Blip2QFormerConfig:
    """SALMONN's Q-Former: ``bert-base-uncased``'s shape cut to 2 layers, cross-attention in each."""
    return Blip2QFormerConfig(
        hidden_size=768,
        num_hidden_layers=2,
        num_attention_heads=12,
        intermediate_size=3072,
        cross_attention_frequency=1,
        encoder_hidden_size=int(encoder_hidden_size),
        vocab_size=2,
        max_position_embeddings=32,
    )


# ------------------------------------------------------------------------------------------- config


def tiny_llama_config(tokenizer: Any = None, **overrides: Any) -> LlamaConfig:
    """A 2-layer, 64-wide Llama over the tiny tokenizer, embeddings tied like Llama-3.2's.

    Without a ``tokenizer`` the tiny tokenizer's size and special ids are taken from its constants
    (its special tokens come first, in :data:`~dramaturg.services.audiollm.tokenizer.SPECIAL_TOKENS`
    order), so a default config does not train a tokenizer.
    """
    if tokenizer is not None:
        vocab, ids = len(tokenizer), (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    else:
        vocab, ids = VOCAB_SIZE, tuple(SPECIAL_TOKENS.index(t) for t in (BOS, EOS, PAD))
    fields: dict[str, Any] = {
        "vocab_size": vocab,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": True,
        "bos_token_id": ids[0],
        "eos_token_id": ids[1],
        "pad_token_id": ids[2],
    }
    fields.update(overrides)
    return LlamaConfig(**fields)


class AudioLlmConfig(PretrainedConfig):
    """Everything needed to rebuild the audio LLM (see the module docstring).

    * ``whisper_config`` (a ``WhisperConfig``; only its encoder is built), ``beats_config`` (a
      speechbrain ``BEATsConfig`` dict, the ``cfg`` of an official checkpoint), ``qformer_config``
      (``Blip2QFormerConfig``; its ``encoder_hidden_size`` is the encoders' widths added up),
      ``text_config`` (``LlamaConfig``). Left ``None``, each is the tiny one.
    * ``use_whisper`` / ``use_beats``: which encoders exist (at least one). The encoder chunk is
      Whisper's ``max_source_positions`` frames either way.
    * ``window`` / ``stride`` (frames, 17 ≈ 0.34 s) and ``num_queries`` (per window): the Q-Former.
    * ``prompt_template`` / ``audio_placeholder``: SALMONN's prompt (``prompt.py``);
      ``audio_token_id``: the id whose positions get the audio tokens.
    * ``freeze_whisper`` / ``freeze_beats`` / ``freeze_language_model``: SALMONN freezes all three.
    * ``ctc_weight`` / ``ctc_alphabet``: an auxiliary CTC loss over the characters of an ASR item's
      transcript, read from Whisper's frames by a linear head (hybrid CTC/attention, Watanabe et al.
      2017). 0 — SALMONN and the production preset — builds no head. A Whisper built here from
      scratch has not had Whisper's ASR pre-training; without this loss the Q-Former gives the LLM
      nothing it can read, and the LLM learns to recite training sentences instead (measured: silent
      audio scored the same loss as the real clips after 1,500 steps). Blank is id 0, the alphabet's
      characters 1…N (:func:`ctc_targets`). ``query_ctc_weight``: the same loss on the Q-Former's
      output tokens (needs ``num_queries`` × 50 / ``window`` tokens a second above the characters a
      second: 8 queries give 23.5). The tokens the LLM reads then spell the words in order, which the
      LLM learns to read sooner than frames it must first learn to align.
    """

    model_type = MODEL_TYPE
    sub_configs_defaults = {
        "whisper_config": WhisperConfig,
        "qformer_config": Blip2QFormerConfig,
        "text_config": LlamaConfig,
    }

    whisper_config: dict | PretrainedConfig | None = None
    beats_config: dict | None = None
    qformer_config: dict | PretrainedConfig | None = None
    text_config: dict | PretrainedConfig | None = None
    use_whisper: bool = True
    use_beats: bool = True
    window: int = WINDOW_FRAMES
    stride: int = WINDOW_FRAMES
    num_queries: int = 1
    prompt_template: str = PROMPT_TEMPLATE
    audio_placeholder: str = AUDIO_PLACEHOLDER
    audio_token_id: int | None = None
    freeze_whisper: bool = True
    freeze_beats: bool = True
    freeze_language_model: bool = True
    ctc_weight: float = 0.0
    query_ctc_weight: float = 0.0
    ctc_alphabet: str = CTC_ALPHABET

    def __post_init__(self, **kwargs: Any) -> None:
        if not (self.use_whisper or self.use_beats):
            raise ValueError("at least one of use_whisper / use_beats must be true")
        if self.ctc_weight < 0 or (self.ctc_weight > 0 and not self.use_whisper):
            raise ValueError("ctc_weight must be ≥ 0, and a CTC loss needs Whisper (use_whisper: true)")
        if self.query_ctc_weight < 0:
            raise ValueError("query_ctc_weight must be ≥ 0")
        if self.whisper_config is None:
            self.whisper_config = tiny_whisper_config()
        if self.beats_config is None:
            self.beats_config = tiny_beats_config()
        self.beats_config = dict(self.beats_config)
        if self.text_config is None:
            self.text_config = tiny_llama_config()
        if self.qformer_config is None:
            self.qformer_config = tiny_qformer_config(self.encoder_hidden_size)
        if self.audio_token_id is None:
            self.audio_token_id = SPECIAL_TOKENS.index(AUDIO_TOKEN)  # the tiny tokenizer's id
        super().__post_init__(**kwargs)

    @property
    def speech_width(self) -> int:
        """Whisper's frame width (0 when Whisper is not used)."""
        if not self.use_whisper:
            return 0
        whisper = self.whisper_config
        return int(whisper["d_model"] if isinstance(whisper, dict) else whisper.d_model)

    @property
    def audio_width(self) -> int:
        """BEATs' token width (0 when BEATs is not used)."""
        return int(self.beats_config.get("encoder_embed_dim", 768)) if self.use_beats else 0

    @property
    def encoder_hidden_size(self) -> int:
        return self.speech_width + self.audio_width

    @property
    def max_source_positions(self) -> int:
        """Encoder frames per chunk (Whisper's window, 1,500 = 30 s for the real one)."""
        whisper = self.whisper_config
        return int(
            whisper["max_source_positions"] if isinstance(whisper, dict) else whisper.max_source_positions
        )


# -------------------------------------------------------------------------------------------- model


class AudioLlmForConditionalGeneration(PreTrainedModel):
    """Audio + prompt ids in, next-token logits out; ``generate`` writes the answer (module docstring)."""

    config_class = AudioLlmConfig
    base_model_prefix = "audiollm"
    main_input_name = "input_ids"
    _supports_sdpa = True
    _supports_attention_backend = True
    _no_split_modules = ["WhisperEncoderLayer", "LlamaDecoderLayer", "Blip2QFormerLayer"]
    # BEATs computes its Kaldi fbank in float32 inside speechbrain's code: its weights must stay float32
    # when the rest loads in bfloat16 (the Q-Former stays float32 too, by Blip2QFormerModel's own rule).
    _keep_in_fp32_modules_strict = ["beats"]

    def __init__(
        self,
        config: AudioLlmConfig,
        *,
        whisper: nn.Module | None = None,
        language_model: LlamaForCausalLM | None = None,
    ) -> None:
        """Build every part from ``config``, or take an already-loaded Whisper encoder / LLM.

        The two keywords are for :func:`assemble_from_pretrained` (pretrained parts are not built at
        random first); ``from_pretrained`` never passes them.
        """
        super().__init__(config)
        if config.use_whisper:
            self.whisper = whisper if whisper is not None else WhisperEncoder(config.whisper_config)
        else:
            self.whisper = None
        self.beats = ConfiguredBEATs(config.beats_config) if config.use_beats else None
        self.speech_qformer = WindowQFormer(
            config.qformer_config,
            speech_width=config.speech_width,
            audio_width=config.audio_width,
            num_queries=config.num_queries,
            window=config.window,
            stride=config.stride,
        )
        self.speech_projection = nn.Linear(config.qformer_config.hidden_size, config.text_config.hidden_size)
        self.speech_ctc_head = (
            nn.Linear(config.speech_width, len(config.ctc_alphabet) + 1) if config.ctc_weight > 0 else None
        )
        self.query_ctc_head = (
            nn.Linear(config.qformer_config.hidden_size, len(config.ctc_alphabet) + 1)
            if config.query_ctc_weight > 0
            else None
        )
        self.language_model = (
            language_model if language_model is not None else LlamaForCausalLM(config.text_config)
        )
        # read by save_pretrained to drop the shared copies (see get_expanded_tied_weights_keys)
        self._tied_weights_keys = self._beats_shared_tables()
        self.post_init()
        self.apply_freezing()

    # ----------------------------------------------------------------------------------- plumbing

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Only the Q-Former's additions and the projection are ours to initialise.

        Whisper, the Q-Former's BERT and Llama initialise themselves (transformers dispatches to their
        own ``_init_weights``); BEATs keeps speechbrain's initialisation from its constructor.
        """
        std = float(self.config.text_config.initializer_range)
        if module is getattr(self, "speech_projection", None):
            hf_init.normal_(module.weight, mean=0.0, std=std)
            hf_init.zeros_(module.bias)
        elif isinstance(module, WindowQFormer):
            hf_init.normal_(
                module.query_tokens, mean=0.0, std=float(self.config.qformer_config.initializer_range)
            )
            for norm in (module.ln_speech, module.ln_audio):
                if norm is not None:
                    hf_init.ones_(norm.weight)
                    hf_init.zeros_(norm.bias)

    def _beats_shared_tables(self) -> dict[str, str]:
        """BEATs' relative-position table: one module shared by all layers (layer 0's)."""
        if self.beats is None or not self.beats.cfg.relative_position_embedding:
            return {}
        source = "beats.encoder.layers.0.self_attn.relative_attention_bias.weight"
        layers = int(self.beats.cfg.encoder_layers)
        return {source.replace("layers.0.", f"layers.{i}."): source for i in range(1, layers)}

    def get_expanded_tied_weights_keys(self, all_submodels: bool = False) -> dict:
        """transformers' tied weights (Llama's embeddings) plus BEATs' shared relative-position table.

        transformers only reads our own ``_tied_weights_keys`` when the config ties word embeddings,
        which this composite config does not; the BEATs table is shared whatever the config says.
        """
        tied = super().get_expanded_tied_weights_keys(all_submodels=all_submodels)
        tied.update(self._beats_shared_tables())
        return tied

    def apply_freezing(self) -> None:
        """``requires_grad`` from the config's ``freeze_*`` switches (SALMONN: encoders and LLM frozen)."""
        if self.whisper is not None:
            self.whisper.requires_grad_(not self.config.freeze_whisper)
            self.whisper.embed_positions.requires_grad_(False)  # Whisper's fixed sinusoids
        if self.beats is not None:
            self.beats.requires_grad_(not self.config.freeze_beats)
        self.language_model.requires_grad_(not self.config.freeze_language_model)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> AudioLlmForConditionalGeneration:
        """transformers' ``from_pretrained``, then the ``freeze_*`` switches again.

        Loading replaces every parameter with a new one that requires grad, which would silently
        unfreeze the encoders (Whisper's fixed position table included) and, through ATen's
        ``requires_grad``-dependent matmul folding, even change the last bits of the outputs.
        """
        model = super().from_pretrained(*args, **kwargs)
        model.apply_freezing()
        return model

    def train(self, mode: bool = True) -> AudioLlmForConditionalGeneration:
        """``nn.Module.train``, except that frozen encoders stay in eval mode (no dropout in them)."""
        super().train(mode)
        if self.whisper is not None and self.config.freeze_whisper:
            self.whisper.eval()
        if self.beats is not None and self.config.freeze_beats:
            self.beats.eval()
        return self

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    # ------------------------------------------------------------------------------------ encoding

    def encode_audio(
        self,
        input_features: torch.Tensor | None,
        input_values: torch.Tensor | None,
        audio_lengths: torch.Tensor,
        *,
        return_frames: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        """Audio tokens at the LLM's width (B, A, H) and their mask (B, A): what the prompt's audio ids get.

        With ``return_frames`` also Whisper's frames (B, F, D), their mask (B, F) and the Q-Former's
        tokens before the projection (B, A, Q), for the CTC heads.

        ``input_features``: Whisper log-mels (B, mels, C·2·frames); ``input_values``: the padded
        16 kHz waveform (B, ≥ samples) for BEATs; ``audio_lengths``: samples per clip (B,). Only the
        chunks that hold audio are encoded (``encoders.py``), only windows that hold audio reach the
        Q-Former (``qformer.py``).
        """
        config = self.config
        frames_per_chunk = config.max_source_positions
        lengths = audio_lengths.to(device=self.device, dtype=torch.long)
        batch = lengths.shape[0]
        mel_frames = 2 * frames_per_chunk
        if input_features is not None:
            chunks = input_features.shape[-1] // mel_frames
        elif input_values is not None:
            chunks = -(-input_values.shape[-1] // chunk_samples(frames_per_chunk))
        else:
            raise ValueError("no audio: input_features and/or input_values are required")
        piece_lengths = chunk_lengths(lengths, chunks, frames_per_chunk)
        active = piece_lengths > 0  # chunks past a clip's end are never encoded
        if int(valid_frames(lengths).max()) > chunks * frames_per_chunk:
            raise ValueError("audio_lengths are longer than the audio given")
        speech = audio = None
        if self.whisper is not None:
            if input_features is None:
                raise ValueError("this model reads Whisper features: input_features is required")
            if chunks * mel_frames != input_features.shape[-1]:
                raise ValueError(f"input_features must be whole chunks of {mel_frames} mel frames")
            mels = input_features.shape[1]
            pieces = input_features.to(self.device).reshape(batch, mels, chunks, mel_frames)
            pieces = pieces.permute(0, 2, 1, 3).reshape(batch * chunks, mels, mel_frames)
            with torch.set_grad_enabled(torch.is_grad_enabled() and not config.freeze_whisper):
                encoded = self.whisper(pieces[active].to(self.whisper.dtype)).last_hidden_state
            speech = encoded.new_zeros(batch * chunks, frames_per_chunk, encoded.shape[-1])
            speech[active] = encoded
            speech = speech.reshape(batch, chunks * frames_per_chunk, -1)
        if self.beats is not None:
            if input_values is None:
                raise ValueError("this model reads BEATs features: input_values (the waveform) is required")
            pieces = split_chunks(input_values.to(self.device, torch.float32), frames_per_chunk)
            if pieces.shape[0] != batch * chunks:
                raise ValueError("input_values and input_features describe different numbers of chunks")
            with torch.set_grad_enabled(torch.is_grad_enabled() and not config.freeze_beats):
                encoded = beats_chunk_features(
                    self.beats, pieces[active], piece_lengths[active], frames_per_chunk
                )
            audio = encoded.new_zeros(batch * chunks, frames_per_chunk, encoded.shape[-1])
            audio[active] = encoded
            audio = audio.reshape(batch, chunks * frames_per_chunk, -1)
        total = chunks * frames_per_chunk
        frame_mask = torch.arange(total, device=lengths.device)[None, :] < valid_frames(lengths)[:, None]
        tokens, token_mask = self.speech_qformer(speech, audio, frame_mask)
        projected = self.speech_projection(tokens.to(self.speech_projection.weight.dtype))
        if return_frames:
            return projected, token_mask, speech, frame_mask, tokens
        return projected, token_mask

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        input_features: torch.Tensor | None,
        input_values: torch.Tensor | None,
        audio_lengths: torch.Tensor | None,
    ) -> torch.Tensor:
        """The prompt's token embeddings with the audio tokens written over the audio ids' positions."""
        return self._embed(input_ids, input_features, input_values, audio_lengths)[0]

    def _embed(
        self,
        input_ids: torch.Tensor,
        input_features: torch.Tensor | None,
        input_values: torch.Tensor | None,
        audio_lengths: torch.Tensor | None,
    ) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]] | None]:
        """:meth:`embed_inputs`, and what the CTC heads read: ``{"frames": (Whisper's frames, mask),
        "queries": (the Q-Former's tokens, mask)}`` (``None`` without audio)."""
        embeds = self.language_model.get_input_embeddings()(input_ids)
        positions = input_ids == int(self.config.audio_token_id)
        if audio_lengths is None:
            if positions.any():
                raise ValueError("the prompt has audio tokens but no audio was given")
            return embeds, None
        tokens, token_mask, speech, frame_mask, queries = self.encode_audio(
            input_features, input_values, audio_lengths, return_frames=True
        )
        expected = token_mask.sum(dim=1)
        found = positions.sum(dim=1)
        if not torch.equal(expected.to(found.device), found):
            raise ValueError(
                f"audio tokens per row: the prompt has {found.tolist()}, the audio gives {expected.tolist()} "
                "(was the processor built with this model's config?)"
            )
        source = tokens[token_mask].to(embeds.dtype)
        states = {"frames": (speech, frame_mask), "queries": (queries, token_mask)}
        return embeds.masked_scatter(positions[..., None].expand_as(embeds), source), states

    def ctc_losses(
        self, states: Mapping[str, tuple[torch.Tensor, torch.Tensor]], ctc_labels: torch.Tensor
    ) -> torch.Tensor:
        """The weighted sum of the CTC losses of the heads the config asks for (``_embed``'s states)."""
        heads = [
            (self.speech_ctc_head, float(self.config.ctc_weight), "frames"),
            (self.query_ctc_head, float(self.config.query_ctc_weight), "queries"),
        ]
        heads = [h for h in heads if h[0] is not None]
        if not heads:
            raise ValueError("ctc_labels given, but this model has no CTC head (ctc_weight is 0)")
        return sum(weight * self.ctc_loss(*states[name], ctc_labels, head) for head, weight, name in heads)

    def ctc_loss(
        self,
        speech: torch.Tensor,
        frame_mask: torch.Tensor,
        ctc_labels: torch.Tensor,
        head: nn.Module | None = None,
    ) -> torch.Tensor:
        """Mean per-character CTC loss of the rows of ``ctc_labels`` (B, L: alphabet ids, -100 padded)
        that hold any (a caption item's row is all -100), read by ``head`` (default: the frames' head)
        from ``speech`` (B, T, D) where ``frame_mask``; 0 when no row holds a transcript."""
        head = head if head is not None else self.speech_ctc_head
        if head is None:
            raise ValueError("ctc_labels given, but this model has no CTC head (ctc_weight is 0)")
        ctc_labels = ctc_labels.to(speech.device)
        target_lengths = (ctc_labels != IGNORE_INDEX).sum(dim=1)
        rows = target_lengths > 0
        if not rows.any():
            return speech.new_zeros(())
        log_probs = head(speech[rows]).float().log_softmax(-1).transpose(0, 1)
        labels = ctc_labels[rows]
        return nn.functional.ctc_loss(
            log_probs,
            labels[labels != IGNORE_INDEX],
            frame_mask[rows].sum(dim=1),
            target_lengths[rows],
            blank=0,
            zero_infinity=True,
        )

    # ------------------------------------------------------------------------------------- forward

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        input_values: torch.Tensor | None = None,
        audio_lengths: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        ctc_labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits (and the loss on ``labels``) of the LLM over the prompt with the audio spliced in.

        ``labels`` are -100 wherever no loss is taken; audio positions are forced to -100 here too.
        Positions count real tokens only (``cumsum`` of the mask), as ``generate`` counts them, so a
        left-padded row gets the logits it gets alone. ``ctc_labels`` (:func:`ctc_targets`, with a
        CTC head) add ``ctc_weight`` / ``query_ctc_weight`` × each head's CTC loss to the loss.
        """
        embeds, frames = self._embed(input_ids, input_features, input_values, audio_lengths)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if labels is not None:
            labels = labels.masked_fill(input_ids == int(self.config.audio_token_id), IGNORE_INDEX)
        output = self.language_model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            **kwargs,
        )
        if ctc_labels is not None and frames is not None and output.loss is not None:
            output.loss = output.loss + self.ctc_losses(frames, ctc_labels)
        return output

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        input_values: torch.Tensor | None = None,
        audio_lengths: torch.Tensor | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """The LLM's ``generate`` on the spliced prompt: (B, prompt + new) ids, prompt included.

        The prompt ids go along with their embeddings, so the output, a ``streamer``'s first ``put``
        and the stopping criteria see the prompt as usual (``TextStreamer(skip_prompt=True)`` skips it).
        All of ``generate``'s keywords work (``max_new_tokens``, ``do_sample``, ``streamer``, …).
        """
        embeds = self.embed_inputs(input_ids, input_features, input_values, audio_lengths)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.language_model.generate(
            input_ids=input_ids, inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs
        )


AutoConfig.register(MODEL_TYPE, AudioLlmConfig, exist_ok=True)
AutoModel.register(AudioLlmConfig, AudioLlmForConditionalGeneration, exist_ok=True)
AutoProcessor.register(AudioLlmConfig, AudioLlmProcessor, exist_ok=True)


# ------------------------------------------------------------------------------------------ builders


def ctc_targets(texts: Sequence[str | None], alphabet: str = CTC_ALPHABET) -> torch.Tensor:
    """Rows of alphabet ids (1…N; 0 is CTC's blank) padded with -100; ``None`` (an item that is not a
    transcript) gives an all -100 row, which :meth:`AudioLlmForConditionalGeneration.ctc_loss` skips."""
    rows = []
    for text in texts:
        spelled = " ".join("".join(c for c in (text or "").lower() if c in alphabet).split())
        rows.append([alphabet.index(c) + 1 for c in spelled])
    width = max([1, *(len(r) for r in rows)])
    out = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def build_processor(
    config: AudioLlmConfig, tokenizer: Any = None, *, audio_token: str | None = None
) -> AudioLlmProcessor:
    """The processor that matches ``config``: Whisper's feature extractor for its window and mel count."""
    whisper = config.whisper_config
    seconds, rest = divmod(config.max_source_positions * 320, 16_000)
    if rest:
        raise ValueError("max_source_positions must make whole seconds (a multiple of 50)")
    extractor = WhisperFeatureExtractor(
        feature_size=int(whisper.num_mel_bins),
        sampling_rate=16_000,
        hop_length=160,
        chunk_length=int(seconds),
    )
    return AudioLlmProcessor(
        extractor,
        tokenizer if tokenizer is not None else build_tokenizer(),
        prompt_template=config.prompt_template,
        audio_placeholder=config.audio_placeholder,
        max_source_positions=config.max_source_positions,
        window_stride=config.stride,
        num_queries=config.num_queries,
        audio_token=audio_token,
    )


def build_tiny_audiollm(
    seed: int | None = 0, **config_overrides: Any
) -> tuple[AudioLlmForConditionalGeneration, AudioLlmProcessor]:
    """A random tiny audio LLM and its processor; the same weights for the same seed.

    ``config_overrides`` go to :class:`AudioLlmConfig` (e.g. ``num_queries=2``, ``use_beats=False``).
    A plain mapping for ``whisper_config``, ``text_config`` or ``qformer_config`` (a recipe's
    ``model:`` section, e.g. ``{text_config: {hidden_size: 128}}``) changes those fields of the tiny
    sub-config and keeps the rest (a bare ``WhisperConfig(**fields)`` would fall back to whisper's own
    defaults: 30-s windows); the Q-Former's ``encoder_hidden_size`` follows the encoders' widths.
    The RNG is forked, so building does not move the caller's global torch seed.
    """
    tokenizer = build_tokenizer()
    fields: dict[str, Any] = {"audio_token_id": tokenizer.audio_token_id}
    fields.update(config_overrides)
    for key, tiny in (("whisper_config", tiny_whisper_config), ("text_config", tiny_llama_config)):
        value = fields.get(key)
        if value is None or isinstance(value, Mapping):
            args = (tokenizer,) if key == "text_config" else ()
            fields[key] = tiny(*args, **dict(value or {}))
    if isinstance(fields.get("qformer_config"), Mapping):
        qformer = dict(fields["qformer_config"])
        width = AudioLlmConfig(**{**fields, "qformer_config": None}).encoder_hidden_size
        encoder_width = int(qformer.pop("encoder_hidden_size", width))
        fields["qformer_config"] = tiny_qformer_config(encoder_width, **qformer)
    config = AudioLlmConfig(**fields)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(int(seed))
        model = AudioLlmForConditionalGeneration(config)
    model.eval()
    log.debug("tiny audio LLM: %s", parameter_count(model))
    return model, build_processor(config, tokenizer)


def save_audiollm(
    model: AudioLlmForConditionalGeneration, processor: AudioLlmProcessor, folder: str | Path
) -> Path:
    """``save_pretrained`` the model and the processor into one folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    reset_padding_state(processor.tokenizer)
    processor.save_pretrained(str(folder))
    return folder


def load_audiollm(
    source: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **from_pretrained_kwargs: Any,
) -> tuple[AudioLlmForConditionalGeneration, AudioLlmProcessor]:
    """Model and processor from a folder :func:`save_audiollm` wrote; the model in eval mode."""
    kwargs = dict(from_pretrained_kwargs)
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AudioLlmForConditionalGeneration.from_pretrained(str(source), **kwargs)
    processor = AudioLlmProcessor.from_pretrained(str(source))
    if device is not None:
        model.to(device)
    model.eval()
    return model, processor


def write_tiny_model(folder: Path, home: Path | None = None, *, seed: int = 0) -> None:
    """An untrained tiny audio LLM + processor in ``folder``, the same for the same seed.

    The signature is the registry's ``ServiceEntry.tiny_model`` writer (``home`` is unused, as in the
    speaker and TTS services').
    """
    model, processor = build_tiny_audiollm(seed=seed)
    save_audiollm(model, processor, folder)


def assemble_from_pretrained(
    *,
    beats_checkpoint: str | Path,
    whisper: str | Path = PRODUCTION_PRESET.whisper,
    language_model: str | Path = PRODUCTION_PRESET.language_model,
    audio_token: str = PRODUCTION_PRESET.audio_token,
    num_queries: int = PRODUCTION_PRESET.num_queries,
    qformer_config: Blip2QFormerConfig | None = None,
    dtype: torch.dtype | None = None,
    **from_pretrained_kwargs: Any,
) -> tuple[AudioLlmForConditionalGeneration, AudioLlmProcessor]:
    """A SALMONN-lite from pretrained parts: Whisper's encoder, a BEATs checkpoint, a Llama + its tokenizer.

    Defaults are :data:`PRODUCTION_PRESET` (hub ids; needs the hub or a local copy, and Llama's
    licence); local folders work the same way, which is how the tests exercise it. The BEATs
    checkpoint is loaded strictly, as speechbrain does; the Q-Former (default
    :func:`production_qformer_config`) and the projection start random.
    """
    kwargs = dict(from_pretrained_kwargs)
    if dtype is not None:
        kwargs["dtype"] = dtype
    whisper_encoder = WhisperModel.from_pretrained(str(whisper), **kwargs).encoder
    llm = LlamaForCausalLM.from_pretrained(str(language_model), **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(language_model))
    if tokenizer.pad_token is None:  # Llama-3 has none; padding is masked, any id will do
        tokenizer.pad_token = tokenizer.eos_token
    ids = tokenizer(audio_token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{audio_token!r} is not one token of {language_model}'s tokenizer")
    audio_id = int(ids[0])
    beats_cfg, beats_state = read_beats_checkpoint(beats_checkpoint)
    encoder_width = int(whisper_encoder.config.d_model) + int(beats_cfg.get("encoder_embed_dim", 768))
    config = AudioLlmConfig(
        whisper_config=whisper_encoder.config,
        beats_config=beats_cfg,
        qformer_config=qformer_config or production_qformer_config(encoder_width),
        text_config=llm.config,
        num_queries=num_queries,
        audio_token_id=int(audio_id),
    )
    model = AudioLlmForConditionalGeneration(config, whisper=whisper_encoder, language_model=llm)
    load_beats_checkpoint(model.beats, beats_state)
    model.eval()
    return model, build_processor(config, tokenizer, audio_token=audio_token)


# ---------------------------------------------------------------------------------------------- LoRA


def lora_config(
    rank: int = PRODUCTION_PRESET.lora_rank,
    alpha: int = PRODUCTION_PRESET.lora_alpha,
    dropout: float = PRODUCTION_PRESET.lora_dropout,
    also_train: Sequence[str] = (),
) -> Any:
    """peft ``LoraConfig``: the LLM's q/k/v/o projections, with the Q-Former and projection trained too
    (and the encoders in ``also_train``, as whole modules)."""
    from peft import LoraConfig

    return LoraConfig(
        r=int(rank),
        lora_alpha=int(alpha),
        lora_dropout=float(dropout),
        target_modules=LORA_TARGET_MODULES,
        modules_to_save=[*TRAINABLE_MODULES, *also_train],
    )


def apply_lora(model: AudioLlmForConditionalGeneration, **lora_kwargs: Any) -> Any:
    """``peft.get_peft_model`` with :func:`lora_config`: LoRA, Q-Former and projection train, nothing else."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(**lora_kwargs))


def unfreeze(model: AudioLlmForConditionalGeneration, parts: Sequence[str], *, lora: bool) -> list[str]:
    """Train ``parts`` (of :data:`UNFREEZABLE`) in full: their ``freeze_*`` switch off, then applied.

    With LoRA the LLM cannot also train in full (the adapter would sit on weights that move under
    it); the encoders can (peft trains them as ``modules_to_save``). Returns the parts, checked.
    """
    parts = list(dict.fromkeys(str(p) for p in parts))
    for part in parts:
        if part not in UNFREEZABLE:
            raise ValueError(f"unfreeze: {part!r} is not one of {', '.join(UNFREEZABLE)}")
        if part == "language_model" and lora:
            raise ValueError(
                "unfreeze: language_model trains the LLM in full; set lora_r: 0 (no LoRA) for that"
            )
        if getattr(model, part) is None:
            raise ValueError(f"unfreeze: this model has no {part} (use_{part.split('_')[0]} is false)")
        setattr(model.config, f"freeze_{part}", False)
    model.apply_freezing()
    model.train(model.training)
    return parts


def refreeze(model: AudioLlmForConditionalGeneration) -> None:
    """Every ``freeze_*`` switch back on (SALMONN's default), as a published model is saved: the next
    stage decides for itself what it trains."""
    for part in UNFREEZABLE:
        setattr(model.config, f"freeze_{part}", True)
    model.apply_freezing()


def parameter_count(model: nn.Module, prefixes: Mapping[str, str] | None = None) -> dict[str, int]:
    """Parameters per part (Whisper, BEATs, Q-Former, projection, LLM) and in total."""
    prefixes = prefixes or {
        "whisper": "whisper.",
        "beats": "beats.",
        "qformer": "speech_qformer.",
        "projection": "speech_projection.",
        "language_model": "language_model.",
    }
    counts = dict.fromkeys(prefixes, 0) | {"other": 0, "total": 0}
    for name, param in model.named_parameters():
        part = next((key for key, prefix in prefixes.items() if name.startswith(prefix)), "other")
        counts[part] += param.numel()
        counts["total"] += param.numel()
    return counts
