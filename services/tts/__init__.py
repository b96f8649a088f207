"""TTS service: speech in a character's voice, and the fish-speech recipe that teaches it the voices.

Being built (issue 14), not yet registered as a service: the model (a small dual-autoregressive
text → codec-token model, transformers' CSM with a Mimi-layout codec), the fish-speech data
preparation (pair validation, loudness normalisation, codec-token extraction, protobuf shards).
Importing this package is cheap: torch and transformers load with the submodules that need them.
"""
