"""The tiny audio LLM's tokenizer: a 1,024-entry byte-level BPE trained here on the synthetic corpus's text.

Why not Llama's: the production preset reads text with the Llama-3 tokenizer (128,256 entries); at
the tiny model's width (64) its embedding table alone would be 8 M parameters, nearly all never
trained, and loading it needs the hub. Why not characters (as the tiny TTS model does): the audio
LLM *writes* text token by token, and a word-piece vocabulary keeps the answers about three times
shorter (a dev-split line: 16 tokens for 50 characters; the ASR prompt: 22 tokens) — faster
generation, shorter dependencies for a 2-layer LM — at 65 k embedding parameters.

* **Byte-level**: the 256 byte symbols are all in the vocabulary, so any text encodes (no ``<unk>``)
  and decodes back exactly; case and punctuation are kept (the prompt's ``USER:``/``ASSISTANT:``
  and a transcript's capitals are part of what the model reads and writes).
* **Trained on** the *train* split of :func:`dramaturg.shared.data.sentences.split_sentences` (so no
  dev/test sentence shaped the vocabulary) plus SALMONN's prompt phrases (:data:`PROMPT_PHRASES`,
  repeated so that ``USER:``, ``ASSISTANT:``, ``<Speech>`` become a few tokens each). The
  ``tokenizers`` BPE trainer is deterministic: the same corpus gives the same merges, so
  :func:`build_tokenizer` gives the same tokenizer on every machine.
* **Special tokens**: ``<pad>``, ``<s>`` (added in front of every encoded text, as Llama's tokenizer
  adds its begin-of-text), ``</s>`` (SALMONN's ``end_sym``: ends every answer, stops generation)
  and ``<SpeechHere>``, the audio placeholder, a single id the processor repeats once per audio
  token and the model overwrites with the Q-Former's outputs (its embedding is never read).

It is a :class:`transformers.PreTrainedTokenizerFast`: ``save_pretrained`` writes ``tokenizer.json``
and ``AutoTokenizer.from_pretrained(folder)`` loads it back.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
AUDIO_TOKEN = "<SpeechHere>"  # SALMONN's placeholder, kept as the tiny tokenizer's audio token
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, AUDIO_TOKEN)
VOCAB_SIZE = 1024
PROMPT_REPEATS = 300  # how often the prompt phrases are fed to the trainer (the sentences appear once)

# SALMONN's prompt frame and the instructions of the service's tasks (see prompt.py).
PROMPT_PHRASES: tuple[str, ...] = (
    "USER: <Speech>",
    "</Speech> Recognize the speech and give me the transcription.",
    "</Speech> Please write down what your hear in the audio.",
    "</Speech> Please describe the audio.",
    "</Speech> Describe the emotion of the speaker in one word.",
    "\nASSISTANT:",
)


def training_texts() -> Iterator[str]:
    """The trainer's corpus: the train split's sentences, then the prompt phrases repeated."""
    from dramaturg.shared.data.sentences import split_sentences

    for sentence in split_sentences()["train"]:
        yield sentence.text
    for _ in range(PROMPT_REPEATS):
        yield from PROMPT_PHRASES


def train_backend(texts: Iterable[str] | None = None, *, vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Train the byte-level BPE (``tokenizers`` object) on ``texts`` (default :func:`training_texts`)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(training_texts() if texts is None else texts, trainer=trainer)
    bos_id = backend.token_to_id(BOS)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    return backend


def build_tokenizer(
    texts: Iterable[str] | None = None, *, vocab_size: int = VOCAB_SIZE
) -> PreTrainedTokenizerFast:
    """The tiny model's tokenizer (see the module docstring), trained now (well under a second)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=train_backend(texts, vocab_size=vocab_size),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens={"audio_token": AUDIO_TOKEN},
        padding_side="left",  # generation continues every row's end; training is indifferent
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )


def reset_padding_state(tokenizer: PreTrainedTokenizerFast) -> None:
    """Clear the padding a batched call left on the ``tokenizers`` backend before saving (as the TTS's).

    A padded call leaves padding switched on in the backend object; saved in that state,
    ``tokenizer.json`` would make anything reading it with ``tokenizers`` itself pad every batch.
    """
    backend = tokenizer.backend_tokenizer
    backend.no_padding()
    backend.no_truncation()
