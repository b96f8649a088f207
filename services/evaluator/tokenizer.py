"""The tiny evaluator's tokenizer: a byte-level BPE trained here on the prompts this service writes.

Why not Qwen2-Audio's own: its 156 k entries would make the tiny model's embedding and LM head about
20 M parameters at width 64 (the rest is 0.3 M), nearly all of them never trained, and loading it needs
the hub. Why not characters: a detailed realism prompt is ~1,100 characters, nine times the audio
tokens of a 5 s clip; trained on the prompts themselves, a 1,024-entry BPE writes it, chat frame
included, in ~360 tokens (~230 for a simple prompt), which keeps CPU training and scoring cheap. A
2,048-entry BPE would save only ~20 % more (words are the floor: BPE never merges across them) for
twice the embedding and head parameters.

* **Layout of Qwen2's tokenizer**: byte-level (any text encodes, no ``<unk>``), digits always split
  one by one (Qwen2's pre-tokenizer does the same) so ``1``..``5`` are single tokens whatever follows
  them, no BOS, ChatML specials ``<|im_start|>``/``<|im_end|>``, ``<|endoftext|>`` as padding, and
  Qwen2-Audio's ``<|audio_bos|>``, ``<|AUDIO|>``, ``<|audio_eos|>``. ``<answer>`` stays plain text.
* **Chat template**: Qwen2-Audio-Instruct's (:data:`CHAT_TEMPLATE`): a default system turn, each audio
  part written as ``Audio k: <|audio_bos|><|AUDIO|><|audio_eos|>\\n`` (the processor repeats
  ``<|AUDIO|>`` once per audio token), ``<|im_start|>assistant\\n`` as the generation prompt.
* **Trained on** every dimension's prompt (detailed and simple) around contexts taken from the
  synthetic corpus's *plan* (character profiles, traits, scene lines; cheap, no audio rendered), the
  answers, and the train split of the sentence bank. The ``tokenizers`` BPE trainer is deterministic,
  so :func:`build_tokenizer` gives the same tokenizer on every machine.
* ``eos_token`` is ``<|im_end|>``: an answer ends its turn with it, and generation stops there.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

from dramaturg.services.evaluator.prompts import (
    DIMENSIONS,
    REALISM,
    RUBRICS,
    SCORES,
    build_prompt,
    format_answer,
    realism_context,
)
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
AUDIO_BOS, AUDIO_TOKEN, AUDIO_EOS = "<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END, AUDIO_BOS, AUDIO_TOKEN, AUDIO_EOS)
VOCAB_SIZE = 1024
PROMPT_REPEATS = 20  # how often each rubric prompt is fed to the trainer (contexts and sentences: once)
DEFAULT_SYSTEM = "You are a helpful assistant."

_IS_AUDIO = "content['type'] == 'audio' or 'audio' in content or 'audio_url' in content"
_AUDIO_PART = (
    "{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>"
)


def _chat_template(message_parts: str) -> str:
    """A ChatML template, default system turn, each list-of-parts message written by ``message_parts``."""
    return (
        "{% set audio_count = namespace(value=0) %}"
        "{% for message in messages %}"
        "{% if loop.first and message['role'] != 'system' %}"
        "<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n"
        "{% endif %}"
        "<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}"
        "{{ message['content'] }}<|im_end|>\n"
        "{% else %}" + message_parts + "<|im_end|>\n"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


# Qwen2-Audio-Instruct's chat template, same output: default system turn, audio parts as
# "Audio k: <|audio_bos|><|AUDIO|><|audio_eos|>\n", text parts verbatim, in the message's order, ChatML turns.
CHAT_TEMPLATE = _chat_template(
    "{% for content in message['content'] %}"
    "{% if " + _IS_AUDIO + " %}" + _AUDIO_PART + "\n"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
)
# The same turns with each message's audio parts written after its text ("\nAudio k: …"): the question
# comes before the clip, so a causal language model reads the clip already knowing what it is asked
# (recipe key ``audio_position: last``; ``model.set_audio_position``).
CHAT_TEMPLATE_AUDIO_LAST = _chat_template(
    "{% for content in message['content'] %}"
    "{% if not (" + _IS_AUDIO + ") and 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}"
    "{% for content in message['content'] %}"
    "{% if " + _IS_AUDIO + " %}{{ '\\n' }}" + _AUDIO_PART + "{% endif %}"  # (HF trims a newline after a tag)
    "{% endfor %}"
)


def _plan_contexts() -> Iterator[tuple[str, str]]:
    """(realism context, archetype-style question) pairs from the default synthetic corpus plan."""
    from dramaturg.shared.data.config import SynthConfig
    from dramaturg.shared.data.plan import plan_corpus
    from dramaturg.shared.data.writers.speech_drame import local_scene

    plan = plan_corpus(SynthConfig())
    for scene in plan.scenes:
        for prev, turn in zip((None, *scene.turns[:-1]), scene.turns, strict=True):
            voice = turn.voice
            context = realism_context(
                {
                    "char_profile": voice.char_profile,
                    "local_scene": local_scene(turn, scene, prev),  # a PlannedLine has .voice/.line
                    "char_style": voice.char_style,
                }
            )
            question = (  # the archetype writer's question shape
                f"You are {voice.name}, {voice.age.lower()}, who is {voice.style.lower()}. {turn.line.cue} "
                f"Respond in a {turn.line.emotion} tone. You say:"
            )
            yield context, question


def training_texts() -> Iterator[str]:
    """The trainer's corpus (module docstring): prompts, answers, chat frame, corpus text."""
    from dramaturg.shared.data.sentences import split_sentences

    contexts = list(_plan_contexts())
    cycle = itertools.cycle(contexts)
    for _ in range(PROMPT_REPEATS):
        for kind, dimensions in DIMENSIONS.items():
            for dimension in dimensions:
                realism, question = next(cycle)
                context = realism if kind == REALISM else question
                yield build_prompt(dimension, context, detailed=True)
                yield build_prompt(dimension, context, detailed=False)
        for score in SCORES:
            yield f"{IM_START}assistant\n{format_answer(score)}{IM_END}\n"
        yield f"{IM_START}system\n{DEFAULT_SYSTEM}{IM_END}\n{IM_START}user\nAudio 1: "
    for realism, question in contexts:
        yield realism
        yield question
    for sentence in split_sentences()["train"]:
        yield sentence.text
    yield from (rubric.name for rubric in RUBRICS.values())


def train_backend(texts: Iterable[str] | None = None, *, vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Train the byte-level BPE (a ``tokenizers`` object) on ``texts`` (default :func:`training_texts`)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(training_texts() if texts is None else texts, trainer=trainer)
    return backend


def build_tokenizer(
    texts: Iterable[str] | None = None, *, vocab_size: int = VOCAB_SIZE
) -> PreTrainedTokenizerFast:
    """The tiny model's tokenizer (module docstring), trained now (about a second)."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_backend(texts, vocab_size=vocab_size),
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        extra_special_tokens={
            "audio_token": AUDIO_TOKEN,
            "audio_bos_token": AUDIO_BOS,
            "audio_eos_token": AUDIO_EOS,
        },
        additional_special_tokens=[IM_START],
        padding_side="left",  # scoring reads every row's last position; generation continues it
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )
    for digit in SCORES:
        if len(tokenizer.encode(str(digit), add_special_tokens=False)) != 1:
            raise RuntimeError(f"the digit {digit} is not one token")
    return tokenizer


def reset_padding_state(tokenizer: PreTrainedTokenizerFast) -> None:
    """Clear the padding a batched call left on the ``tokenizers`` backend before saving.

    A padded call leaves padding switched on in the backend object; saved in that state,
    ``tokenizer.json`` would make anything reading it with ``tokenizers`` itself pad every batch.
    """
    backend = tokenizer.backend_tokenizer
    backend.no_padding()
    backend.no_truncation()
