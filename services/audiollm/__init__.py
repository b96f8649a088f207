"""Audio-LLM service (SALMONN-lite: Whisper + BEATs → window Q-Former → Llama): text from audio.

The model lives in ``model`` (config, model, tiny builder, production preset, LoRA), with ``encoders``
(Whisper / BEATs and long-audio chunking), ``qformer`` (the window-level Q-Former), ``tokenizer`` (the
tiny model's byte-level BPE) and ``prompt`` (SALMONN's prompt format and the processor). Serving:
``server`` (Generate, GenerateStream), ``generation`` (request checks, the text-delta streamer, the
deadline check, metrics), ``config``. Training: ``recipes`` (light) and ``train``. Evaluation (ASR
WER, captioning scores, submission CSVs and their validator, TTFT / TPOT): ``evaluate``. Importing this
package is cheap: torch and transformers load with the submodules that need them.
"""

from dramaturg.shared.registry import ServiceEntry

SERVICE = ServiceEntry(
    name="audiollm",
    factory="dramaturg.services.audiollm.server:create_service",
    settings="dramaturg.services.audiollm.config:AudioLlmSettings",
    recipes="dramaturg.services.audiollm.recipes:RECIPES",
    tiny_model="dramaturg.services.audiollm.model:write_tiny_model",
    evaluate="dramaturg.services.audiollm.evaluate:main",
    demo_config="presets/demo.yaml",
    extra="audiollm",
    description="text from audio (SALMONN-lite): transcripts, captions, answers, whole or streamed by token",
)
