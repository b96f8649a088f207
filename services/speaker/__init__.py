"""Speaker service: speaker embeddings for verification and identification, and how to train them.

``model`` holds the encoder (wav2vec2, x-vector or ECAPA behind one Hugging Face model class),
``heads`` the training losses, ``data`` the VoxCeleb-style corpus readers, ``evaluate`` EER/minDCF
scoring and ``train`` the recipes the shared training runner starts. Importing this package is cheap:
torch, transformers and speechbrain load with the submodules that need them.
"""
