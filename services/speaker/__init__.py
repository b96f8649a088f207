"""Speaker service: speaker embeddings for verification and identification, and how to train them.

The model is the platform's voice encoder (wav2vec2, x-vector or ECAPA behind one Hugging Face
model class) with its PLDA, in ``shared/voice`` because diarization embeds with it too. Here:
``heads`` the training losses, ``data`` the VoxCeleb-style corpus readers, ``evaluate`` EER/minDCF
scoring and ``train`` the recipes the shared training runner starts. Importing this package is cheap:
torch, transformers and speechbrain load with the submodules that need them.
"""

from dramaturg.shared.registry import ServiceEntry

SERVICE = ServiceEntry(
    name="speaker",
    factory="dramaturg.services.speaker.server:create_service",
    settings="dramaturg.services.speaker.config:SpeakerSettings",
    recipes="dramaturg.services.speaker.recipes:RECIPES",
    tiny_model="dramaturg.services.speaker.model:write_tiny_model",
    demo_config="presets/demo.yaml",
    extra="speaker",
    description="speaker embeddings, verification, enrolled voices",
)
