"""Audio-LLM service (SALMONN-lite: Whisper + BEATs → window Q-Former → Llama): being built, not registered.

The model lives in ``model`` (config, model, tiny builder, production preset, LoRA), with ``encoders``
(Whisper / BEATs and long-audio chunking), ``qformer`` (the window-level Q-Former), ``tokenizer`` (the
tiny model's byte-level BPE) and ``prompt`` (SALMONN's prompt format and the processor). There is no
``SERVICE`` entry yet: the registry does not list this package until its server exists.
"""
