"""The speaker encoder: every architecture builds tiny, round-trips through save/from_pretrained,
batches exactly, pools every way "Fine-tuning wav2vec2 for speaker recognition" lists, and returns
L2-normalised float32 embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from dramaturg.shared.voice.encoder import (
    POOLINGS,
    TINY_WAV2VEC2,
    SpeakerEncoder,
    SpeakerEncoderConfig,
)
from transformers import AutoModel

ARCHITECTURES = ("wav2vec2", "xvector", "ecapa")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _waves(seed: int = 0, lengths: tuple[int, ...] = (8000, 6173, 4000, 10001, 4800)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in lengths]


def _encoder(**fields: object) -> SpeakerEncoder:
    torch.manual_seed(0)
    return SpeakerEncoder(SpeakerEncoderConfig(**fields)).eval()


def _padded_forward(encoder: SpeakerEncoder, waves: list[np.ndarray]) -> np.ndarray:
    """One zero-padded batch straight through forward (no length grouping)."""
    lengths = torch.tensor([len(w) for w in waves])
    batch = torch.zeros(len(waves), int(lengths.max()))
    for row, wav in enumerate(waves):
        batch[row, : len(wav)] = torch.from_numpy(wav)
    with torch.no_grad():
        return torch.nn.functional.normalize(encoder(batch, lengths=lengths), dim=-1).numpy()


def _one_by_one(encoder: SpeakerEncoder, waves: list[np.ndarray]) -> np.ndarray:
    return np.stack([encoder.embed([w])[0] for w in waves])


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_save_and_reload_give_identical_embeddings(architecture: str, tmp_path: Path) -> None:
    encoder = _encoder(architecture=architecture, threshold=0.42)
    waves = _waves()
    before = encoder.embed(waves)
    assert before.dtype == np.float32 and before.shape == (len(waves), encoder.embedding_size)
    np.testing.assert_allclose(np.linalg.norm(before, axis=1), 1.0, atol=1e-5)
    assert np.isfinite(before).all()

    encoder.save_pretrained(str(tmp_path))
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "config.json").exists()
    reloaded = SpeakerEncoder.from_pretrained(str(tmp_path))
    assert reloaded.config.architecture == architecture and reloaded.config.threshold == pytest.approx(0.42)
    # The weights come back bit for bit; the embeddings to float32 rounding: with one torch thread,
    # oneDNN may pick another kernel for tensors loaded from safetensors (their memory alignment
    # differs), which reorders a sum (seen: 6e-8 on ECAPA). Anything a save/load could break is larger.
    original, loaded = encoder.state_dict(), reloaded.state_dict()
    assert original.keys() == loaded.keys()
    assert all(torch.equal(original[k], loaded[k]) for k in original)
    np.testing.assert_allclose(reloaded.embed(waves), before, rtol=0, atol=1e-6)
    via_auto = AutoModel.from_pretrained(str(tmp_path))  # the model type is registered with transformers
    assert isinstance(via_auto, SpeakerEncoder)
    np.testing.assert_allclose(via_auto.embed(waves), before, rtol=0, atol=1e-6)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_padded_batches_match_one_by_one(architecture: str) -> None:
    encoder = _encoder(architecture=architecture)
    waves = _waves(seed=1)
    alone = _one_by_one(encoder, waves)
    assert encoder.padding_invariant
    np.testing.assert_allclose(_padded_forward(encoder, waves), alone, atol=1e-4)
    np.testing.assert_allclose(encoder.embed(waves, batch_size=3), alone, atol=1e-4)
    assert not encoder.training  # embed restores the mode it found


@pytest.mark.parametrize(
    "fields",
    [
        {"architecture": "ecapa", "conv_padding": "reflect"},
        {"architecture": "xvector", "conv_padding": "reflect"},
        {
            "architecture": "wav2vec2",
            "backbone": {**TINY_WAV2VEC2, "feat_extract_norm": "group", "do_stable_layer_norm": False},
        },
    ],
    ids=["ecapa-reflect", "xvector-reflect", "wav2vec2-groupnorm"],
)
def test_models_that_cannot_batch_exactly_are_grouped_by_length(fields: dict) -> None:
    encoder = _encoder(**fields)
    waves = _waves(seed=2)
    alone = _one_by_one(encoder, waves)
    assert not encoder.padding_invariant
    # Plain padding really does change these models' embeddings (so the exact path above is needed)…
    assert np.abs(_padded_forward(encoder, waves) - alone).max() > 1e-3
    # …and embed() avoids it by batching equal lengths only.
    same_length = [*waves, waves[0].copy()]
    np.testing.assert_allclose(encoder.embed(same_length), _one_by_one(encoder, same_length), atol=1e-4)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_every_pooling_embeds(pooling: str) -> None:
    encoder = _encoder(architecture="wav2vec2", pooling=pooling, embedding_dim=24)
    waves = _waves(seed=3, lengths=(8000, 3500, 5500))
    vectors = encoder.embed(waves)
    assert vectors.shape == (3, 24) and np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vectors, _one_by_one(encoder, waves), atol=1e-4)
    np.testing.assert_array_equal(encoder.embed(waves), vectors)  # deterministic outside training ("random")
    encoder.train()
    out = encoder(torch.from_numpy(np.stack([w[:3500] for w in waves])))
    out.sum().backward()  # every pooling is differentiable
    assert out.shape == (3, 24)


def test_pooled_sizes_without_projection() -> None:
    hidden = TINY_WAV2VEC2["hidden_size"]
    sizes = {
        p: _encoder(architecture="wav2vec2", pooling=p).embedding_size
        for p in ("mean", "mean+std", "quantile")
    }
    assert sizes == {"mean": hidden, "mean+std": 2 * hidden, "quantile": 5 * hidden}


def test_frames_for_ctc_and_cls_token() -> None:
    encoder = _encoder(architecture="wav2vec2", pooling="first+cls")
    assert encoder.cls_token is not None
    frames, mask = encoder.frames(torch.zeros(2, 16000), lengths=torch.tensor([16000, 8000]))
    assert frames.shape == (2, 49, encoder.frame_size)  # 20 ms frames, CLS dropped
    assert mask.sum(dim=1).tolist() == [49, 24]
    with pytest.raises(ValueError, match="wav2vec2 only"):
        _encoder(architecture="ecapa").frames(torch.zeros(1, 16000))


def test_feature_encoder_freeze_switch() -> None:
    frozen = _encoder(architecture="wav2vec2")
    assert not any(p.requires_grad for p in frozen.backbone.feature_extractor.parameters())
    unfrozen = _encoder(architecture="wav2vec2", freeze_feature_encoder=False)
    assert all(p.requires_grad for p in unfrozen.backbone.feature_extractor.parameters())


def test_config_validates_and_applies_ablation_switches() -> None:
    with pytest.raises(ValueError, match="architecture"):
        SpeakerEncoderConfig(architecture="resnet")
    with pytest.raises(ValueError, match="pooling"):
        SpeakerEncoderConfig(architecture="wav2vec2", pooling="median")
    with pytest.raises(ValueError, match="lobe pools"):
        SpeakerEncoderConfig(architecture="ecapa", pooling="mean")
    config = SpeakerEncoderConfig(architecture="wav2vec2", layerdrop=0.05, mask_time_prob=0.1)
    assert config.backbone["layerdrop"] == 0.05 and config.backbone["mask_time_prob"] == 0.1
    assert SpeakerEncoderConfig(architecture="ecapa").pooling == "attentive"


def test_embed_nothing() -> None:
    encoder = _encoder(architecture="ecapa")
    assert encoder.embed([]).shape == (0, encoder.embedding_size)


def test_speechbrain_checkpoint_loads_through_encoder_classifier(tmp_path: Path) -> None:
    """The spkrec-ecapa-voxceleb path, offline: a local folder laid out like the hub repository."""
    from dramaturg.shared.voice.encoder import build_encoder
    from speechbrain.lobes.models.ECAPA_TDNN import ECAPA_TDNN

    lobe = {
        "channels": [32, 32, 32, 32, 96],
        "kernel_sizes": [5, 3, 3, 3, 1],
        "dilations": [1, 2, 3, 4, 1],
        "attention_channels": 16,
        "res2net_scale": 4,
        "se_channels": 16,
    }
    source = tmp_path / "spkrec-tiny"
    source.mkdir()
    torch.manual_seed(3)
    reference = ECAPA_TDNN(input_size=24, lin_neurons=48, **lobe)
    torch.save(reference.state_dict(), source / "embedding_model.ckpt")
    (source / "hyperparams.yaml").write_text(f"""
n_mels: 24
compute_features: !new:speechbrain.lobes.features.Fbank
    n_mels: !ref <n_mels>
mean_var_norm: !new:speechbrain.processing.features.InputNormalization
    norm_type: sentence
    std_norm: False
embedding_model: !new:speechbrain.lobes.models.ECAPA_TDNN.ECAPA_TDNN
    input_size: !ref <n_mels>
    channels: {lobe["channels"]}
    kernel_sizes: {lobe["kernel_sizes"]}
    dilations: {lobe["dilations"]}
    attention_channels: 16
    res2net_scale: 4
    se_channels: 16
    lin_neurons: 48
modules:
    compute_features: !ref <compute_features>
    mean_var_norm: !ref <mean_var_norm>
    embedding_model: !ref <embedding_model>
pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables:
        embedding_model: !ref <embedding_model>
    paths:
        embedding_model: {source}/embedding_model.ckpt
""")
    config = SpeakerEncoderConfig(
        architecture="ecapa", n_mels=24, embedding_dim=48, lobe=lobe, pretrained_lobe=str(source)
    )
    encoder = build_encoder(config, cache_dir=tmp_path / "cache")
    for key, value in reference.state_dict().items():
        assert torch.equal(encoder.lobe.state_dict()[key], value), key
    fresh = build_encoder(
        config, reset_weights=True, cache_dir=tmp_path / "cache"
    )  # the "no pretraining" ablation
    assert not torch.equal(
        fresh.lobe.state_dict()["fc.conv.weight"], reference.state_dict()["fc.conv.weight"]
    )
    mismatched = SpeakerEncoderConfig(
        architecture="ecapa", n_mels=24, embedding_dim=64, lobe=lobe, pretrained_lobe=str(source)
    )
    with pytest.raises(ValueError, match="does not match"):
        build_encoder(mismatched, cache_dir=tmp_path / "cache2")
