"""The tiny TTS model's text tokenizer: one token per character, plus the tokens CSM's prompt needs.

Why characters: the production model (``sesame/csm-1b``) reads text with the Llama-3 tokenizer, 128,256
entries. At the tiny model's width (64) that embedding table alone would be 8.2 M parameters, ten
times the rest of the model, nearly all of it never trained on a small corpus, and loading it needs
the hub. A character vocabulary has tens of entries, covers any script the synthetic drama corpus
writes, and gives a small model the easiest possible text-to-sound alignment (one token per letter).

The vocabulary (:data:`VOCABULARY`, 75 entries) is the special tokens, then space, ``a``–``z``,
``0``–``9`` and ASCII punctuation. Text is normalised first (NFKD, accents stripped, lower-cased,
whitespace runs made one space), so ``"Héllo  World"`` reads as ``"hello world"``; a character still
outside the vocabulary becomes ``<unk>``. CSM's speaker prefix ``"[0]"`` needs no token of its own:
``[``, the digits and ``]`` are characters, so any speaker id spells itself.

Special tokens, none of which normalisation touches:

* ``<bos>`` / ``<eos>``: around each utterance's text, as CSM's chat template writes
  ``<bos>[speaker]text<eos>``; the post-processor adds them when ``add_special_tokens=True``;
* ``<|AUDIO|>`` / ``<|audio_eos|>``: the names ``CsmProcessor`` looks for; the processor repeats
  ``<|AUDIO|>`` once per codec frame of the utterance's audio and the model puts that frame's codebook
  embeddings there;
* ``<pad>``: its own token, not the audio token (csm-1b pads with the audio token's id), so a padded
  position can never be mistaken for an audio frame when labels are built;
* ``<unk>``.

The result is a :class:`transformers.PreTrainedTokenizerFast` over a ``tokenizers`` object, so it
saves with ``save_pretrained`` and loads back with ``AutoTokenizer.from_pretrained(folder)``.
"""

from __future__ import annotations

import string

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors
from transformers import PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
AUDIO_TOKEN, AUDIO_EOS_TOKEN = "<|AUDIO|>", "<|audio_eos|>"  # the names CsmProcessor expects
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, BOS, EOS, AUDIO_TOKEN, AUDIO_EOS_TOKEN)
CHARACTERS: tuple[str, ...] = (" ", *string.ascii_lowercase, *string.digits, *string.punctuation)
VOCABULARY: tuple[str, ...] = SPECIAL_TOKENS + CHARACTERS

# Typographic characters the corpus' writers might produce, mapped to the ASCII the vocabulary has.
_TYPOGRAPHY = {"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": "-"}


def _normalizer() -> normalizers.Normalizer:
    steps: list[normalizers.Normalizer] = [normalizers.NFKD(), normalizers.StripAccents()]
    steps += [normalizers.Replace(src, dst) for src, dst in _TYPOGRAPHY.items()]
    steps += [normalizers.Lowercase(), normalizers.Replace(Regex(r"\s+"), " ")]
    return normalizers.Sequence(steps)


def build_backend() -> Tokenizer:
    """The ``tokenizers`` object: a BPE model with no merges, i.e. a character lookup.

    A merge-free BPE splits any string into its characters and maps each to its id (``<unk>`` when
    absent); the ``Fuse`` decoder joins tokens back without the spaces a plain decode would insert.
    """
    vocab = {token: index for index, token in enumerate(VOCABULARY)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.normalizer = _normalizer()
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        pair=f"{BOS} $A {EOS} $B {EOS}",
        special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])],
    )
    return backend


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The character tokenizer as a transformers fast tokenizer (see the module docstring)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=build_backend(),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens={"audio_token": AUDIO_TOKEN, "audio_eos_token": AUDIO_EOS_TOKEN},
        padding_side="left",  # CsmProcessor pads on the left: generation continues every row's end
        model_max_length=4096,
    )


def reset_padding_state(tokenizer: PreTrainedTokenizerFast) -> None:
    """Clear the padding and truncation a batched call left on the ``tokenizers`` backend.

    A padded call (``CsmProcessor`` pads every batch) enables padding on the backend object and
    leaves it on; saved in that state, ``tokenizer.json`` carries a ``padding`` section. transformers
    clears it when it loads the file, but anything reading ``tokenizer.json`` with the ``tokenizers``
    library itself (``Tokenizer.from_file``) then left-pads every batch. Call this before saving.
    """
    backend = tokenizer.backend_tokenizer
    backend.no_padding()
    backend.no_truncation()
