"""Diarization service: who spoke when, with pyannote.audio's segmentation + embedding + clustering pipeline.

``model`` builds, saves and loads the pipeline artifact (a segmentation checkpoint, an embedding
model and the tuned pipeline parameters), ``evaluate`` scores a pipeline with DER on a
pyannote.database protocol, and ``train`` holds the recipes the shared training runner starts
(segmentation fine-tuning, then pipeline hyper-parameter optimisation). Importing this package is
cheap: torch and pyannote load with the submodules that need them.
"""

from dramaturg.shared.registry import ServiceEntry

SERVICE = ServiceEntry(
    name="diarization",
    factory="dramaturg.services.diarization.server:create_service",
    settings="dramaturg.services.diarization.config:DiarizationSettings",
    recipes="dramaturg.services.diarization.recipes:RECIPES",
    tiny_model="dramaturg.services.diarization.model:default_artifact",
    demo_config="presets/demo.yaml",
    extra="diarization",
    description="who spoke when (pyannote pipeline)",
)
