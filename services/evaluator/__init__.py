"""Evaluator service (a Speech-DRAME-style acting judge on Qwen2-Audio): 1-5 scores per acting dimension.

The model lives in ``model`` (tiny config and tokenizer, processor, save/load, production preset,
LoRA targets), with ``prompts`` (Speech-DRAME's single-dimension prompts and the ``<answer>N</answer>``
format), ``scoring`` (expected-value scores over the digits 1..5, one audio encoding shared by every
dimension's prompt, plain generation), ``collate`` (the SFT collator: loss on the answer only) and
``tokenizer`` (the tiny model's byte-level BPE and Qwen2-Audio's chat template). Serving: ``server``
(Evaluate, ListDimensions), ``config``. Training: ``recipes`` (light), ``train`` and ``grpo`` (TRL's
GRPOTrainer with the audio in every pass). Evaluation reports: ``evaluate``. Importing this
package is cheap: torch and transformers load with the submodules that need them.
"""

from dramaturg.shared.registry import ServiceEntry

SERVICE = ServiceEntry(
    name="evaluator",
    factory="dramaturg.services.evaluator.server:create_service",
    settings="dramaturg.services.evaluator.config:EvaluatorSettings",
    recipes="dramaturg.services.evaluator.recipes:RECIPES",
    tiny_model="dramaturg.services.evaluator.model:write_tiny_model",
    evaluate="dramaturg.services.evaluator.evaluate:main",
    demo_config="presets/demo.yaml",
    extra="evaluator",
    description="1-5 scores per acting dimension (Speech-DRAME realism and archetype rubrics) from audio",
)
