"""The voice library: models two services load, written once.

``encoder`` is the speaker encoder (a Hugging Face ``PreTrainedModel`` over wav2vec2 / x-vector /
ECAPA) the speaker service trains and serves; ``plda`` the VBx PLDA fitted on its training speakers;
``pyannote_embedding`` the encoder dressed as a pyannote embedding model, which the diarization
pipeline clusters with. Services import this package; they never import each other.
"""
