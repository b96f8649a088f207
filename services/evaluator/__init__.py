"""Evaluator service (a Speech-DRAME-style acting judge on Qwen2-Audio): being built, not registered.

The model lives in ``model`` (tiny config and tokenizer, processor, save/load, production preset,
LoRA targets), with ``prompts`` (Speech-DRAME's single-dimension prompts and the ``<answer>N</answer>``
format), ``scoring`` (expected-value scores over the digits 1..5, one audio encoding shared by every
dimension's prompt, plain generation), ``collate`` (the SFT collator: loss on the answer only) and
``tokenizer`` (the tiny model's byte-level BPE and Qwen2-Audio's chat template). There is no
``SERVICE`` entry yet: the registry does not list this package until its server exists.
"""
