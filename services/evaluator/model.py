"""The evaluator model: transformers' Qwen2-Audio, a Speech-DRAME-style judge of acting in speech.

Qwen2-Audio reads audio with a Whisper-shaped encoder (two convolutions, the second with stride 2, then
transformer layers, then an average pool of 2: 25 audio tokens a second), projects every pooled frame
to the language model's width and writes it over one ``<|AUDIO|>`` position of the prompt; a Qwen2
decoder then reads the prompt and answers. Speech-DRAME's DRAME-Eval is Qwen2-Audio-7B-Instruct
fine-tuned (fully or with LoRA) to answer ``<answer>N</answer>`` to one-dimension prompts
(``prompts.py``); this service scores with the probabilities of the digits at the answer position
(``scoring.py``) and trains the same way (``collate.py``). Everything is one
``Qwen2AudioForConditionalGeneration`` with its ``Qwen2AudioProcessor`` (Whisper's feature extractor,
the tokenizer, the chat template), so ``save_pretrained`` / ``from_pretrained`` carry it in one folder.

Two sizes:

* **production** (:data:`PRODUCTION_PRESET`): ``Qwen/Qwen2-Audio-7B-Instruct`` (about 8 B parameters),
  loaded by :func:`load_pretrained_evaluator` only when it is available on this machine (a local folder
  or the hub cache; nothing here downloads). Never loaded by the tests.
* **tiny** (:func:`build_tiny_evaluator`): the same classes built from configs — a 2-layer, 64-wide
  audio encoder with 5 s windows and a 2-layer, 64-wide Qwen2 over a 1,024-entry byte-level BPE
  (``tokenizer.py``): about 0.33 M parameters, for tests, CPU training checks and a stack that has
  trained nothing yet (:func:`write_tiny_model`).

**The encoder window.** The encoder accepts exactly ``2 × max_source_positions`` mel frames (its
position table has ``max_source_positions`` rows, one per frame after the stride-2 convolution), and
the processor pads every clip to the feature extractor's ``chunk_length`` seconds (100 mel frames a
second) and truncates longer ones. The two must agree: production has 30 s (3,000 mel frames, 1,500
positions, up to 750 audio tokens); the tiny model has :data:`TINY_WINDOW_SECONDS` = 5 s (500 mel
frames, 250 positions, up to 125 audio tokens), six times less encoder work for the synthetic corpus's
few-second lines. The number of ``<|AUDIO|>`` tokens follows the clip's real length (the processor
counts unpadded frames), not the window. :func:`check_window` verifies a model/processor pair.

Traps handled here:

* peft's ``"all-linear"`` (and Speech-DRAME's own leaf-name list ``q_proj``, ``k_proj``, …) also adapts
  the audio encoder, whose attention has ``q_proj``/``k_proj``/``v_proj`` too:
  :data:`LORA_TARGET_MODULES` is anchored at ``model.language_model.``.
* TRL's ``GRPOTrainer`` reads ``model.config.image_token_id`` when it builds its multimodal
  bookkeeping; Qwen2-Audio has no such field, so the config gets one, equal to the audio token id.
* ``audio_token_index`` must be an id inside the text vocabulary (it is embedded before being
  overwritten); the tiny tokenizer's ``<|AUDIO|>`` is.
* ``<answer>`` is not a special token (see ``prompts.py``).
* The encoder's position table (``embed_positions``) is built frozen, but ``from_pretrained`` hands it
  back with ``requires_grad=True``; :func:`load_evaluator` freezes it again (a full fine-tune would
  otherwise train it; LoRA freezes it anyway).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from dramaturg.services.evaluator.tokenizer import (
    AUDIO_BOS,
    AUDIO_EOS,
    AUDIO_TOKEN,
    CHAT_TEMPLATE,
    CHAT_TEMPLATE_AUDIO_LAST,
    ENDOFTEXT,
    IM_END,
    build_tokenizer,
    reset_padding_state,
)
from torch import nn
from transformers import (
    AutoProcessor,
    PreTrainedTokenizerBase,
    Qwen2AudioConfig,
    Qwen2AudioEncoderConfig,
    Qwen2AudioForConditionalGeneration,
    Qwen2AudioProcessor,
    Qwen2Config,
    WhisperFeatureExtractor,
)
from transformers.masking_utils import create_bidirectional_mask

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
HOP_LENGTH = 160  # Whisper's mel hop: 100 mel frames a second
NUM_MEL_BINS = 128  # Qwen2-Audio's (Whisper-large-v3's); kept by the tiny model so features are alike
TINY_WINDOW_SECONDS = 5  # the tiny encoder's window (module docstring)
PRODUCTION_WINDOW_SECONDS = 30

# LoRA targets: every attention and MLP projection of the language model's decoder layers, nothing in the
# audio encoder or the projector. A peft ``target_modules`` string is a full-match regex over module names.
LORA_TARGET_MODULES = (
    r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
)


@dataclass(frozen=True)
class ProductionPreset:
    """What the service runs in production, described (loaded only when available; never by the tests)."""

    model_id: str = "Qwen/Qwen2-Audio-7B-Instruct"
    audio_encoder: str = "Whisper-large-v3 shape: 32 layers, d_model 1280, 20 heads, 128 mels, 30 s windows"
    language_model: str = "Qwen-7B (Qwen2 architecture): 32 layers, hidden 4096, vocabulary 156,032"
    audio_token: str = AUDIO_TOKEN  # id 151646 in its tokenizer
    window_seconds: int = PRODUCTION_WINDOW_SECONDS  # 1,500 encoder positions, ≤ 750 audio tokens
    parameters: str = "about 8 B (bfloat16 weights: about 16 GB)"
    # Speech-DRAME's LoRA recipe (finetuning/conf/sft_lora.yaml), restricted to the language model.
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    learning_rate: float = 5e-5
    gated: bool = False  # Apache-2.0, no licence click-through
    note: str = "load_pretrained_evaluator() on a machine that has it (local folder or hub cache)"


PRODUCTION_PRESET = ProductionPreset()


# ------------------------------------------------------------------------------------------- configs


def tiny_audio_config(**overrides: Any) -> Qwen2AudioEncoderConfig:
    """A 2-layer, 64-wide Qwen2-Audio encoder with a :data:`TINY_WINDOW_SECONDS` window, 128 mels."""
    fields: dict[str, Any] = {
        "num_mel_bins": NUM_MEL_BINS,
        "encoder_layers": 2,
        "encoder_attention_heads": 4,
        "encoder_ffn_dim": 128,
        "d_model": 64,
        "max_source_positions": TINY_WINDOW_SECONDS * SAMPLE_RATE // HOP_LENGTH // 2,
    }
    fields.update(overrides)
    return Qwen2AudioEncoderConfig(**fields)


def tiny_text_config(tokenizer: PreTrainedTokenizerBase, **overrides: Any) -> Qwen2Config:
    """A 2-layer, 64-wide Qwen2 (grouped-query attention, 4 heads over 2 key/value heads) over ``tokenizer``.

    Embeddings are not tied, as in Qwen2-Audio-7B; that also lets a test set the LM head on its own.
    """
    fields: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": None,  # Qwen2 puts no BOS in front of a text
    }
    fields.update(overrides)
    return Qwen2Config(**fields)


def evaluator_config(
    tokenizer: PreTrainedTokenizerBase,
    *,
    audio_config: Qwen2AudioEncoderConfig | None = None,
    text_config: Qwen2Config | None = None,
) -> Qwen2AudioConfig:
    """The model config: tiny sub-configs by default, the audio token id from ``tokenizer``.

    ``image_token_id`` is set to the audio token id for TRL's ``GRPOTrainer`` (module docstring).
    """
    audio_id = int(tokenizer.convert_tokens_to_ids(AUDIO_TOKEN))
    return Qwen2AudioConfig(
        audio_config=audio_config if audio_config is not None else tiny_audio_config(),
        text_config=text_config if text_config is not None else tiny_text_config(tokenizer),
        audio_token_index=audio_id,
        image_token_id=audio_id,
    )


def build_processor(
    tokenizer: PreTrainedTokenizerBase, *, window_seconds: int = TINY_WINDOW_SECONDS
) -> Qwen2AudioProcessor:
    """Whisper's feature extractor with a ``window_seconds`` window + the tokenizer + the chat template."""
    extractor = WhisperFeatureExtractor(
        feature_size=NUM_MEL_BINS,
        sampling_rate=SAMPLE_RATE,
        hop_length=HOP_LENGTH,
        chunk_length=int(window_seconds),
        return_attention_mask=True,
    )
    return Qwen2AudioProcessor(
        extractor,
        tokenizer,
        chat_template=CHAT_TEMPLATE,
        audio_token=AUDIO_TOKEN,
        audio_bos_token=AUDIO_BOS,
        audio_eos_token=AUDIO_EOS,
    )


def check_window(model: nn.Module, processor: Qwen2AudioProcessor) -> None:
    """Raise when the processor's padded length is not the encoder's input length (module docstring)."""
    config = unwrap(model).config
    expected = 2 * int(config.audio_config.max_source_positions)
    got = int(processor.feature_extractor.nb_max_frames)
    if got != expected:
        raise ValueError(
            f"the processor pads audio to {got} mel frames but the encoder takes exactly {expected} "
            "(2 × max_source_positions): build the processor with the model's window"
        )


AUDIO_POSITIONS = ("", "first", "last")


def set_audio_position(processor: Qwen2AudioProcessor, position: str) -> None:
    """Where a user turn's clip goes: ``first`` (before the prompt, Qwen2-Audio-Instruct's and
    Speech-DRAME's order), ``last`` (after it), ``""`` (leave the processor's template as it is).

    It is the processor's chat template that places the audio, so the choice is saved with the model
    (``save_pretrained``) and every reader of it — training, scoring, GRPO, the server — prompts it the
    way it was trained. Why ``last`` exists: with the clip first, a causal language model encodes the clip
    before it knows the dimension asked about, and only the few positions after the prompt can pick out
    that dimension's cue; with the clip last, every audio position already sees the question.
    ``first`` / ``last`` replace the processor's template with this project's Qwen2-Audio-Instruct
    layout (:data:`~.tokenizer.CHAT_TEMPLATE`, same output as the hub model's) or its audio-last twin.
    """
    if position not in AUDIO_POSITIONS:
        raise ValueError(f"audio_position {position!r}: expected first, last or \"\" (keep the model's)")
    if position:
        processor.chat_template = CHAT_TEMPLATE_AUDIO_LAST if position == "last" else CHAT_TEMPLATE


def unwrap(model: nn.Module) -> Qwen2AudioForConditionalGeneration:
    """The ``Qwen2AudioForConditionalGeneration`` inside a peft model (the model itself otherwise)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(base, Qwen2AudioForConditionalGeneration):
        raise TypeError(f"expected a Qwen2AudioForConditionalGeneration, got {type(base).__name__}")
    return base


def project_audio(model: nn.Module, input_features: torch.Tensor,
                  feature_attention_mask: torch.Tensor) -> list[torch.Tensor]:
    """Encoder + projector on a batch of mel features, as ``Qwen2AudioModel.forward`` runs them (each clip
    its own padding mask): one (tokens, hidden) tensor per clip, its padding dropped. Gradients flow
    if enabled."""
    inner = unwrap(model).model
    tower = inner.audio_tower
    input_features = input_features.to(tower.device)
    frames = feature_attention_mask.to(tower.device).sum(-1)
    conv_lengths, token_lengths = tower._get_feat_extract_output_lengths(frames)
    positions = (input_features.shape[-1] - 2) // 2 + 1
    frame_mask = (torch.arange(positions, device=tower.device)[None, :] < conv_lengths[:, None]).long()
    dtype = inner.get_input_embeddings().weight.dtype
    attention = create_bidirectional_mask(
        config=tower.config,
        inputs_embeds=torch.zeros((input_features.shape[0], positions, 1), dtype=dtype, device=tower.device),
        attention_mask=frame_mask,
    )
    hidden = tower(input_features.to(dtype), attention_mask=attention).last_hidden_state
    projected = inner.multi_modal_projector(hidden)
    return [projected[i, : int(token_lengths[i])] for i in range(input_features.shape[0])]


def audio_inputs_embeds(model: nn.Module, input_ids: torch.Tensor, input_features: torch.Tensor,
                        feature_attention_mask: torch.Tensor) -> torch.Tensor:
    """The token embeddings of ``input_ids`` with each clip's projected audio written over its
    ``<|AUDIO|>`` positions: what Qwen2-Audio's forward builds before its language model runs."""
    base = unwrap(model)
    embeds = base.get_input_embeddings()(input_ids)
    audio = torch.cat(project_audio(model, input_features, feature_attention_mask)).to(embeds.dtype)
    positions = input_ids == int(base.config.audio_token_id)
    if int(positions.sum()) != audio.shape[0]:
        raise ValueError(f"{int(positions.sum())} audio tokens in the text, {audio.shape[0]} audio frames")
    return embeds.masked_scatter(positions[..., None], audio)


def virtual_tokens(model: nn.Module) -> int:
    """How many learnt positions a prompt-learning model puts before every input (0: none)."""
    config = getattr(model, "active_peft_config", None)
    if config is None or not getattr(config, "is_prompt_learning", False):
        return 0
    return int(config.num_virtual_tokens)


def soft_prompt_kind(model: nn.Module) -> str:
    """``prompt`` (learnt input embeddings), ``prefix`` (learnt keys and values) or "" (neither)."""
    if not virtual_tokens(model):
        return ""
    kind = str(getattr(model.active_peft_config.peft_type, "value", model.active_peft_config.peft_type))
    return {"PROMPT_TUNING": PROMPT_TUNING, "PREFIX_TUNING": PREFIX_TUNING}.get(kind, kind.lower())


def _audio_before_prompt_tuning(module: nn.Module, args: tuple[Any, ...],
                                kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    features = kwargs.get("input_features")
    if features is None or kwargs.get("input_ids") is None or kwargs.get("inputs_embeds") is not None:
        return args, kwargs
    mask = kwargs.pop("feature_attention_mask")
    kwargs.pop("input_features")
    kwargs["inputs_embeds"] = audio_inputs_embeds(module, kwargs.pop("input_ids"), features, mask)
    kwargs["input_ids"] = None
    return args, kwargs


def hear_through_prompt_tuning(model: nn.Module) -> nn.Module:
    """Make a prompt-tuned Qwen2-Audio hear its audio; returns ``model``.

    peft's prompt tuning hands the base model ``inputs_embeds`` (the soft prompt, then the text's
    embeddings), and Qwen2-Audio's forward writes the audio into its embeddings only when it builds
    them from ``input_ids`` itself: given ``inputs_embeds`` it drops ``input_features`` without a word
    (transformers 5.23, peft 0.21) — a silently audio-blind model. A forward pre-hook on the peft model
    writes the audio in first (:func:`audio_inputs_embeds`), so peft prepends the soft prompt to
    embeddings that hold it. A test checks that the audio changes the scores. Prefix tuning passes
    ``input_ids`` on (its prompt is keys and values), so the model hears without help: a no-op there.
    """
    if soft_prompt_kind(model) == PROMPT_TUNING and not getattr(model, "_hears_through_prompt_tuning", False):
        model.register_forward_pre_hook(_audio_before_prompt_tuning, with_kwargs=True)
        model._hears_through_prompt_tuning = True
    return model


# ------------------------------------------------------------------------------------------ builders


def _set_generation_defaults(model: Qwen2AudioForConditionalGeneration, tokenizer: Any) -> None:
    """Stop at the end of the turn (``<|im_end|>``) or of the text; pad with ``<|endoftext|>``."""
    eos = [int(tokenizer.convert_tokens_to_ids(t)) for t in (IM_END, ENDOFTEXT)]
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = int(tokenizer.pad_token_id)
    model.generation_config.bos_token_id = None


def build_tiny_evaluator(
    seed: int | None = 0, **config_overrides: Any
) -> tuple[Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor]:
    """A random tiny evaluator and its processor; the same weights for the same seed.

    ``config_overrides`` go to :func:`evaluator_config` (``audio_config=``, ``text_config=``). The RNG
    is forked, so building does not move the caller's global torch seed.
    """
    tokenizer = build_tokenizer()
    config = evaluator_config(tokenizer, **config_overrides)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(int(seed))
        model = Qwen2AudioForConditionalGeneration(config)
    _set_generation_defaults(model, tokenizer)
    model.eval()
    window = int(config.audio_config.max_source_positions) * 2 * HOP_LENGTH // SAMPLE_RATE
    processor = build_processor(tokenizer, window_seconds=window)
    check_window(model, processor)
    log.debug("tiny evaluator: %s", parameter_count(model))
    return model, processor


def save_evaluator(
    model: Qwen2AudioForConditionalGeneration, processor: Qwen2AudioProcessor, folder: str | Path
) -> Path:
    """``save_pretrained`` the model and the processor into one folder (a prompt-tuned model: the base,
    and its soft prompt in :data:`PROMPT_ADAPTER_DIR`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if virtual_tokens(model):  # the frozen base, then the soft prompt beside it
        unwrap(model).save_pretrained(str(folder))
        model.save_pretrained(str(folder / PROMPT_ADAPTER_DIR))
    else:
        model.save_pretrained(str(folder))
    reset_padding_state(processor.tokenizer)
    processor.save_pretrained(str(folder))
    return folder


def load_evaluator(
    source: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **from_pretrained_kwargs: Any,
) -> tuple[nn.Module, Qwen2AudioProcessor]:
    """Model and processor from a folder (:func:`save_evaluator`'s, or a hub snapshot); model in eval mode.

    A folder with a soft prompt (:data:`PROMPT_ADAPTER_DIR`, from ``peft: prompt | prefix``) comes back as
    the peft model around its base (``unwrap`` reaches the base).

    Checks the processor's window against the encoder's and makes sure ``image_token_id`` is set (a
    hub checkpoint does not have it).
    """
    kwargs = dict(from_pretrained_kwargs)
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = Qwen2AudioForConditionalGeneration.from_pretrained(str(source), **kwargs)
    processor = AutoProcessor.from_pretrained(
        str(source), **{k: v for k, v in kwargs.items() if k in ("local_files_only", "revision")}
    )
    if getattr(model.config, "image_token_id", None) is None:
        model.config.image_token_id = int(model.config.audio_token_id)
    # the encoder's position table is frozen by its __init__ but comes back trainable from from_pretrained
    model.model.audio_tower.embed_positions.requires_grad_(False)
    check_window(model, processor)
    soft_prompt = Path(source) / PROMPT_ADAPTER_DIR
    if (soft_prompt / "adapter_config.json").is_file():
        from peft import PeftModel

        model = hear_through_prompt_tuning(PeftModel.from_pretrained(model, str(soft_prompt)))
    if device is not None:
        model.to(device)
    model.eval()
    return model, processor


def production_available(source: str | Path = PRODUCTION_PRESET.model_id) -> bool:
    """Whether :func:`load_pretrained_evaluator` would find ``source`` without the network."""
    path = Path(source)
    if path.exists() or path.is_absolute() or str(source).startswith("."):
        return (path / "config.json").is_file()
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        return isinstance(try_to_load_from_cache(str(source), "config.json"), str)
    except HFValidationError:  # neither a folder here nor a hub id
        return False


def load_pretrained_evaluator(
    source: str | Path = PRODUCTION_PRESET.model_id,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = torch.bfloat16,
) -> tuple[Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor]:
    """The production preset (or any Qwen2-Audio checkpoint) from a local folder or the hub cache only.

    There is no hub at run time: a checkpoint that is not on this machine raises ``FileNotFoundError``
    instead of starting a 16 GB download.
    """
    if not production_available(source):
        raise FileNotFoundError(
            f"{source} is not on this machine (local folder or hub cache); fetch it ahead of time"
        )
    return load_evaluator(source, device=device, dtype=dtype, local_files_only=True)


def write_tiny_model(folder: Path, home: Path | None = None, *, seed: int = 0) -> None:
    """An untrained tiny evaluator + processor in ``folder``, the same for the same seed.

    The signature is the registry's ``ServiceEntry.tiny_model`` writer (``home`` is unused, as in the
    other services').
    """
    model, processor = build_tiny_evaluator(seed=seed)
    save_evaluator(model, processor, folder)


# ---------------------------------------------------------------------------------------------- LoRA


def lora_config(
    rank: int = PRODUCTION_PRESET.lora_rank,
    alpha: int = PRODUCTION_PRESET.lora_alpha,
    dropout: float = PRODUCTION_PRESET.lora_dropout,
) -> Any:
    """peft ``LoraConfig`` on the language model's projections only (:data:`LORA_TARGET_MODULES`)."""
    from peft import LoraConfig

    return LoraConfig(
        r=int(rank),
        lora_alpha=int(alpha),
        lora_dropout=float(dropout),
        target_modules=LORA_TARGET_MODULES,
        bias="none",
        task_type="CAUSAL_LM",
    )


# IA3 (Liu et al. 2022): learnt scales on the keys, the values and the MLP's input to its down
# projection, in the language model only; the down projection is the feed-forward module (its *input*
# is scaled). Anchored like :data:`LORA_TARGET_MODULES`.
IA3_TARGET_MODULES = r"model\.language_model\.layers\.\d+\.(self_attn\.(k|v)_proj|mlp\.down_proj)"
IA3_FEEDFORWARD_MODULES = r"model\.language_model\.layers\.\d+\.mlp\.down_proj"
# peft methods whose adapters merge into the weights (a standalone folder, no peft at serving time)
MERGEABLE_PEFT = ("lora", "qlora", "adalora", "ia3")
# Prompt learning, the model frozen: prompt tuning (Lester et al. 2021: learnt virtual-token embeddings
# before every prompt) and prefix tuning (Li & Liang 2021: learnt keys and values before every prompt,
# in every layer). Nothing to merge, so the published folder is the base model plus the soft prompt in
# PROMPT_ADAPTER_DIR, which :func:`load_evaluator` wraps back with peft.
PROMPT_TUNING = "prompt"
PREFIX_TUNING = "prefix"
PROMPT_LEARNING = (PROMPT_TUNING, PREFIX_TUNING)
PROMPT_ADAPTER_DIR = "prompt_learning"


def adalora_schedule(total_steps: int) -> dict[str, int]:
    """AdaLoRA's budget schedule over a run: 10 % warm-up at full rank, the last 20 % at the final rank.

    peft needs ``tinit < total_step − tfinal`` (a budgeting phase must exist); rank is reallocated
    every ``deltaT`` steps in between.
    """
    total = max(3, int(total_steps))
    tinit, tfinal = total // 10, max(1, total // 5)
    return {"total_step": total, "tinit": tinit, "tfinal": tfinal, "deltaT": max(1, total // 20)}


def peft_config(
    method: str,
    *,
    rank: int = PRODUCTION_PRESET.lora_rank,
    alpha: int = PRODUCTION_PRESET.lora_alpha,
    dropout: float = PRODUCTION_PRESET.lora_dropout,
    total_steps: int = 0,
    modules_to_save: list[str] | None = None,
    virtual_tokens: int = 20,
) -> Any:
    """The peft config of a method (``lora``/``qlora`` | ``adalora`` | ``ia3`` | ``prompt`` | ``prefix``),
    language model only. ``prompt``: ``virtual_tokens`` learnt embeddings before every prompt (random
    init); ``prefix``: ``virtual_tokens`` learnt keys and values in every layer.

    ``qlora`` is LoRA over a 4-bit base (the quantisation is the loader's job, not the config's).
    AdaLoRA starts every adapter at 1.5 × ``rank`` and prunes the budget down to ``rank`` over
    ``total_steps`` (:func:`adalora_schedule`); it needs ``update_and_allocate`` after each optimizer
    step (the recipe's callback does it).
    """
    from peft import AdaLoraConfig, IA3Config, PrefixTuningConfig, PromptTuningConfig

    if method == PROMPT_TUNING:
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=int(virtual_tokens))
    if method == PREFIX_TUNING:
        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=int(virtual_tokens))
    if method in ("lora", "qlora"):
        config = lora_config(rank, alpha, dropout)
    elif method == "adalora":
        config = AdaLoraConfig(
            init_r=max(1, round(1.5 * rank)),
            target_r=int(rank),
            lora_alpha=int(alpha),
            lora_dropout=float(dropout),
            target_modules=LORA_TARGET_MODULES,
            task_type="CAUSAL_LM",
            **adalora_schedule(total_steps),
        )
    elif method == "ia3":
        config = IA3Config(
            target_modules=IA3_TARGET_MODULES,
            feedforward_modules=IA3_FEEDFORWARD_MODULES,
            task_type="CAUSAL_LM",
        )
    else:
        raise ValueError(f"peft {method!r}: expected one of {', '.join((*MERGEABLE_PEFT, *PROMPT_LEARNING))}")
    config.modules_to_save = list(modules_to_save) if modules_to_save else None
    return config


def apply_lora(model: Qwen2AudioForConditionalGeneration, **lora_kwargs: Any) -> Any:
    """``peft.get_peft_model`` with :func:`lora_config`: only the adapters train."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(**lora_kwargs))


def parameter_count(model: nn.Module, prefixes: Mapping[str, str] | None = None) -> dict[str, int]:
    """Parameters per part (audio encoder, projector, language model, LM head) and in total."""
    prefixes = prefixes or {
        "audio_encoder": "model.audio_tower.",
        "projector": "model.multi_modal_projector.",
        "language_model": "model.language_model.",
        "lm_head": "lm_head.",
    }
    counts = dict.fromkeys(prefixes, 0) | {"other": 0, "total": 0}
    for name, param in unwrap(model).named_parameters():
        part = next((key for key, prefix in prefixes.items() if name.startswith(prefix)), "other")
        counts[part] += param.numel()
        counts["total"] += param.numel()
    return counts
