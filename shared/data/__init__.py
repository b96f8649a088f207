"""Synthetic data for dramaturg: seeded espeak-ng voices, rendering, prosody labels, the corpus builder.

Nothing can be downloaded where dramaturg is built and tested, so the corpus every service trains on is
made here (``dramaturg data synth OUT``). Import from the submodules: ``synth`` (SynthConfig,
synthesize_corpus: the orchestrator), ``plan`` (what to render, from the seed), ``scripts`` (the
script bank, data in ``scripts.yaml``), ``sentences`` (thousands of generated lines and their
text-disjoint train/dev/test split, data in ``grammar.yaml``), ``corpus`` (plan → audio: ``mixdown``,
``clips`` over ``render``, ``voices`` and ``prosody``), ``writers`` (one module per output format) and
``seeds``.
"""
