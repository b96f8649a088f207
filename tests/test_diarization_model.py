"""The diarization artifact: build, save, reload and apply a pyannote pipeline from local parts only.

One tiny synthetic corpus is made per module; the models are tiny and untrained (seeded), so the
checks are about plumbing that must be exact (weights, params, embeddings), not about accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from dramaturg.services.diarization.model import (
    DEFAULT_PARAMS,
    PIPELINE_FILE,
    SpeakerStoreEmbedding,
    attach_specifications,
    build_pipeline,
    build_segmentation,
    default_artifact,
    diarize,
    load_embedding,
    load_pipeline,
    pipeline_params,
    read_artifact,
    resolve_embedding,
    resolve_plda,
    save_artifact,
    save_pyannote_checkpoint,
    tiny_speaker_encoder,
)
from dramaturg.shared.data.synth import SynthConfig, synthesize_corpus
from dramaturg.shared.store import ModelStore
from pyannote.audio.pipelines.speaker_verification import PretrainedSpeakerEmbedding
from pyannote.core import Annotation

SAMPLE_RATE = 16_000


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One short synthetic scene (two to four characters taking turns)."""
    out = tmp_path_factory.mktemp("diarization-corpus")
    synthesize_corpus(out, SynthConfig(num_speakers=4, heldout_speakers=2, scenes_train=1, scenes_dev=1,
                                       scenes_test=1, lines_per_scene=4, utterances_per_speaker=2))
    return out / "diarization" / "wav" / "test_000.wav"


def _segmentation(seed: int) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = attach_specifications(build_segmentation({"sincnet": {"stride": 20}}), duration=2.0)
    return model.eval()


def _segment_scores(pipeline, scene: Path) -> np.ndarray:
    return pipeline.get_segmentations({"uri": "scene", "audio": str(scene)}).data


def test_saved_artifact_reloads_to_identical_outputs(tmp_path: Path, scene: Path) -> None:
    segmentation = _segmentation(seed=1)
    encoder = tiny_speaker_encoder(seed=2)
    params = {"segmentation": {"min_duration_off": 0.25},
              "clustering": {"method": "average", "min_cluster_size": 3, "threshold": 0.9}}
    built = build_pipeline(segmentation, SpeakerStoreEmbedding(encoder), params=params, segmentation_step=0.5)
    expected, expected_exclusive = diarize(built, scene)

    save_artifact(tmp_path / "art", segmentation, params=pipeline_params(built),
                  embedding={"kind": "speaker-store", "ref": "untrained:ecapa", "model": encoder},
                  metrics={"der_dev_after": 0.5}, segmentation_step=0.5)
    spec = read_artifact(tmp_path / "art")
    assert spec["params"] == params and spec["metrics"] == {"der_dev_after": 0.5}
    assert spec["der"]["collar"] == 0.0 and spec["der"]["skip_overlap"] is False
    assert spec["embedding"]["kind"] == "speaker-store"
    assert (tmp_path / "art" / "embedding" / "config.json").is_file()

    loaded = load_pipeline(tmp_path / "art", segmentation_batch_size=4, embedding_batch_size=3)
    assert loaded.segmentation_batch_size == 4 and loaded.embedding_batch_size == 3
    assert pipeline_params(loaded) == params
    # the networks themselves: same scores, same embeddings (a weight lost on the way would show here;
    # the reloaded encoder's weights are laid out anew, which moves float32 sums by ~1e-8)
    np.testing.assert_array_equal(_segment_scores(loaded, scene), _segment_scores(built, scene))
    wave = torch.randn(2, 1, 2 * SAMPLE_RATE, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(loaded._embedding(wave), built._embedding(wave), rtol=0, atol=1e-6)
    got, got_exclusive = diarize(loaded, scene)
    assert got == expected and got_exclusive == expected_exclusive
    assert len(got) > 0

    # a different segmentation must not give the same scores: the comparison above can fail
    other = build_pipeline(_segmentation(seed=3), SpeakerStoreEmbedding(encoder), params=params,
                           segmentation_step=0.5)
    assert not np.array_equal(_segment_scores(other, scene), _segment_scores(built, scene))


def test_regions_end_on_their_last_active_frame(tmp_path: Path, scene: Path) -> None:
    """pyannote's task labels a region's end frame as active, so the region must end on that frame's
    centre, not on the next one's (``Binarize``'s rule, kept with ``offset_at_last_frame=False``)."""
    from pyannote.core import Segment, SlidingWindow, SlidingWindowFeature

    frames = SlidingWindow(start=0.0, duration=0.05, step=0.02)  # frame i centred on 0.025 + 0.02 i
    activity = np.zeros((50, 2), dtype=np.int8)
    activity[10:20, 0] = 1   # centres 0.225 … 0.405
    activity[30:31, 1] = 1   # one frame: nothing left once it ends on its own centre
    activity[40:45, 1] = 1   # centres 0.825 … 0.905
    discrete = SlidingWindowFeature(activity, frames)
    pipeline = build_pipeline(_segmentation(seed=1), SpeakerStoreEmbedding(tiny_speaker_encoder(seed=2)),
                              segmentation_step=0.5)
    assert pipeline.offset_at_last_frame
    ours = pipeline.to_annotation(discrete).itertracks(yield_label=True)
    assert [(round(s.start, 3), round(s.end, 3), label) for s, _, label in ours] \
        == [(0.225, 0.405, 0), (0.825, 0.905, 1)]
    pipeline.offset_at_last_frame = False
    theirs = pipeline.to_annotation(discrete)
    assert [(round(s.start, 3), round(s.end, 3)) for s in theirs.itersegments()] \
        == [(0.225, 0.425), (0.625, 0.645), (0.825, 0.925)]
    assert theirs.label_timeline(1).crop(Segment(0.6, 0.7)).duration() > 0  # pyannote keeps the 1-frame one

    # the choice is part of the artifact; artifacts written before it existed load with pyannote's rule
    encoder = tiny_speaker_encoder(seed=2)
    for flag in (True, False):
        folder = tmp_path / f"art-{flag}"
        save_artifact(folder, _segmentation(seed=1), params=DEFAULT_PARAMS,
                      embedding={"kind": "speaker-store", "ref": "untrained:ecapa", "model": encoder},
                      metrics={}, segmentation_step=0.5, offset_at_last_frame=flag)
        assert read_artifact(folder)["offset_at_last_frame"] is flag
        assert load_pipeline(folder).offset_at_last_frame is flag
    spec = json.loads((folder / PIPELINE_FILE).read_text())
    del spec["offset_at_last_frame"]
    (folder / PIPELINE_FILE).write_text(json.dumps(spec))
    assert load_pipeline(folder).offset_at_last_frame is False


def test_speaker_store_embedding_adapter(tmp_path: Path) -> None:
    encoder = tiny_speaker_encoder(seed=0)
    inference = PretrainedSpeakerEmbedding(SpeakerStoreEmbedding(encoder, min_seconds=0.1))
    assert inference.sample_rate == SAMPLE_RATE and inference.dimension == encoder.embedding_size == 128
    assert inference.metric == "cosine" and inference.min_num_samples == 1600

    rng = torch.Generator().manual_seed(0)
    waves = torch.randn(3, 1, 2 * SAMPLE_RATE, generator=rng)
    masks = torch.zeros(3, 100)
    masks[0, :50] = 1.0      # first second only
    masks[1, :] = 1.0        # everything
    masks[2, :2] = 1.0       # 40 ms: too short for an embedding
    out = inference(waves, masks=masks)
    assert out.shape == (3, 128)
    assert np.all(np.isnan(out[2])) and not np.any(np.isnan(out[:2]))
    np.testing.assert_allclose(np.linalg.norm(out[:2], axis=1), 1.0, rtol=1e-5)
    # the masked row is the embedding of the selected samples alone, as the encoder computes it
    direct = encoder.embed([waves[0, 0, :SAMPLE_RATE].numpy(), waves[1, 0].numpy()])
    np.testing.assert_allclose(out[:2], direct, atol=1e-5)
    assert not np.allclose(out[0], out[1], atol=1e-3)


def test_pyannote_embedding_from_a_local_checkpoint(tmp_path: Path) -> None:
    from pyannote.audio.models.embedding import XVectorMFCC

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        xvector = XVectorMFCC(dimension=32).eval()
    save_pyannote_checkpoint(xvector, tmp_path / "xvector")
    choice = resolve_embedding({"kind": "pyannote", "checkpoint": str(tmp_path / "xvector")})
    inference = PretrainedSpeakerEmbedding(choice.model)
    assert inference.dimension == 32 and inference.sample_rate == SAMPLE_RATE
    waves = torch.randn(2, 1, SAMPLE_RATE, generator=torch.Generator().manual_seed(1))
    out = inference(waves, masks=torch.ones(2, 50))
    assert out.shape == (2, 32) and np.all(np.isfinite(out))
    with torch.no_grad():
        np.testing.assert_allclose(out, xvector(waves).numpy(), rtol=1e-5, atol=1e-6)

    # in an artifact: copied in, reloaded by pyannote's Model.from_pretrained
    save_artifact(tmp_path / "art", _segmentation(seed=0), params=DEFAULT_PARAMS, embedding=choice.spec,
                  metrics={})
    spec = json.loads((tmp_path / "art" / PIPELINE_FILE).read_text())
    assert spec["embedding"]["kind"] == "pyannote" and spec["embedding"]["path"] == "embedding"
    reloaded = PretrainedSpeakerEmbedding(load_embedding(tmp_path / "art"))
    np.testing.assert_array_equal(reloaded(waves, masks=torch.ones(2, 50)), out)


def test_default_artifact_diarizes_a_scene(tmp_path: Path, scene: Path) -> None:
    default_artifact(tmp_path / "art")
    spec = read_artifact(tmp_path / "art")
    assert spec["embedding"]["ref"] == "untrained:ecapa" and spec["params"] == DEFAULT_PARAMS
    pipeline = load_pipeline(tmp_path / "art")
    for kwargs in ({}, {"num_speakers": 2}):
        diarization, exclusive = diarize(pipeline, str(scene), **kwargs)
        assert isinstance(diarization, Annotation) and isinstance(exclusive, Annotation)
        assert diarization.uri == exclusive.uri == "test_000"
        assert all(label.startswith("SPEAKER_") for label in diarization.labels())
        assert exclusive.get_overlap().duration() == 0.0  # at most one speaker at a time
        if kwargs:
            assert len(diarization.labels()) <= 2


def test_default_artifact_prefers_the_store_default_speaker_model(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "home")
    writer = store.create_version("speaker", "voices", architecture="ecapa", base_model="", recipe="test")
    with writer as staging:
        tiny_speaker_encoder(seed=5).save_pretrained(str(staging))
    store.set_default("speaker", "voices")
    default_artifact(tmp_path / "art", home=tmp_path / "home")
    assert read_artifact(tmp_path / "art")["embedding"]["ref"] == "voices:v1"
    loaded = load_embedding(tmp_path / "art")
    reference = tiny_speaker_encoder(seed=5)
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(loaded.encoder.state_dict()[name], tensor)


def test_vbx_artifact_with_the_embedding_models_plda(tmp_path: Path, scene: Path) -> None:
    """``plda: embedding``: the speaker model's own PLDA drives VBx, travels inside the artifact
    (``embedding/plda``) and the reloaded pipeline gives the same diarization."""
    from dramaturg.shared.voice.plda import fit_for_encoder

    encoder = tiny_speaker_encoder(seed=2)
    encoder.save_pretrained(str(tmp_path / "voices"))
    with pytest.raises(ValueError, match="has no plda/"):
        resolve_plda("embedding", {"kind": "speaker-store", "ref": "voices:v1", "path": tmp_path / "voices"})
    rng = np.random.default_rng(0)
    waves = [rng.normal(0, 0.1, SAMPLE_RATE).astype(np.float32) * (1 + i % 5) for i in range(20)]
    fit_for_encoder(encoder, waves, [f"s{i % 5}" for i in range(20)], tmp_path / "voices" / "plda", crops=1)
    spec = {"kind": "speaker-store", "ref": "voices:v1", "path": tmp_path / "voices"}
    plda = resolve_plda("embedding", spec)
    assert plda == tmp_path / "voices" / "plda"

    segmentation = _segmentation(seed=1)
    params = {"segmentation": {"min_duration_off": 0.1},
              "clustering": {"threshold": 0.6, "Fa": 0.07, "Fb": 0.8}}
    built = build_pipeline(segmentation, SpeakerStoreEmbedding(encoder), params=params,
                           clustering="VBxClustering", plda=plda, segmentation_step=0.5)
    expected, _ = diarize(built, scene)
    save_artifact(tmp_path / "art", segmentation, params=params, embedding=spec, metrics={},
                  clustering="VBxClustering", plda="embedding", segmentation_step=0.5)
    stored = read_artifact(tmp_path / "art")
    assert stored["clustering"] == "VBxClustering" and stored["plda"] == "embedding/plda"
    assert (tmp_path / "art" / "embedding" / "plda" / "plda.npz").is_file()
    loaded = load_pipeline(tmp_path / "art")
    assert pipeline_params(loaded) == params
    got, _ = diarize(loaded, scene)
    assert got == expected and len(got) > 0
    # a PLDA folder of its own is copied into the artifact (self-contained), not referenced
    save_artifact(tmp_path / "art2", segmentation, params=params, embedding=spec, metrics={},
                  clustering="VBxClustering", plda=plda, segmentation_step=0.5)
    assert read_artifact(tmp_path / "art2")["plda"] == "plda"
    assert diarize(load_pipeline(tmp_path / "art2"), scene)[0] == expected
