"""TTS service: speech in a character's voice, and the fish-speech recipe that teaches it the voices.

The model is transformers' CSM (a text → Mimi-codec-token model with its codec) in ``model``, with
``codec_stream`` (frames → audio as they are generated) and ``tokenizer`` (the tiny model's character
tokenizer). Serving: ``server`` (Synthesize, SynthesizeOnline, voices), ``synthesis`` (request checks,
output encoding, the deadline check, metrics), ``voices`` (reference-prompt and LoRA voices on disk),
``config``. Data preparation: ``dataset``, ``extract``, ``shards``. Importing this package is cheap:
torch and transformers load with the submodules that need them.
"""

from dramaturg.shared.registry import ServiceEntry

SERVICE = ServiceEntry(
    name="tts",
    factory="dramaturg.services.tts.server:create_service",
    settings="dramaturg.services.tts.config:TtsSettings",
    recipes="dramaturg.services.tts.recipes:RECIPES",
    tiny_model="dramaturg.services.tts.model:write_tiny_model",
    demo_config="presets/demo.yaml",
    extra="tts",
    description="speech in a character's voice (CSM), whole or streamed; reference-prompt and LoRA voices",
)
