import numpy as np
import pytest
from transformers import WhisperProcessor

from conftest import DEMO, write_tone
from whisper_lora.audio import load_audio
from whisper_lora.audio import log_mel
from whisper_lora.errors import UserError
from whisper_lora.features import FeatureCache, write_feature_cache
from whisper_lora.manifest import Sample, read_manifest


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return WhisperProcessor.from_pretrained(tiny_model_dir)


def test_cached_features_equal_the_extractors_within_float16(tmp_path, processor):
    samples = read_manifest(DEMO / "dev.jsonl")[:4]
    samples.append(Sample(write_tone(tmp_path / "full.wav", seconds=30.0), "a full window"))
    stats = write_feature_cache(samples, processor, tmp_path / "cache", progress=False)
    assert stats["clips"] == 5 and stats["errors"] == 0
    cache = FeatureCache(tmp_path / "cache")
    for sample in samples:
        expected = log_mel(processor, load_audio(sample.audio_path))
        got, seconds = cache.get(sample.id)
        assert got.shape == expected.shape == (80, 3000)
        assert np.abs(got - expected).max() < 4e-3  # float16 storage; padding rebuilt exactly
        assert seconds == pytest.approx(len(load_audio(sample.audio_path)) / 16000)
    # Only real frames are stored: a few-second clip takes a fraction of the 3000 frames.
    assert stats["frames"] < 3000 + 4 * 1000


def test_unreadable_and_overlong_clips_are_listed_not_cached(tmp_path, processor):
    (tmp_path / "bad.wav").write_bytes(b"not audio at all")
    samples = [Sample(tmp_path / "bad.wav", "x"), Sample(write_tone(tmp_path / "long.wav", seconds=31), "y")]
    stats = write_feature_cache(samples, processor, tmp_path / "cache", progress=False)
    cache = FeatureCache(tmp_path / "cache")
    assert stats["clips"] == 0 and len(cache.errors) == 2
    assert "bad.wav" in cache.errors[samples[0].id] and "longer than Whisper's 30 s window" in cache.errors[samples[1].id]
    assert cache.get(samples[0].id) is None


def test_a_folder_that_is_not_a_cache_is_refused(tmp_path):
    with pytest.raises(UserError, match="not a feature cache"):
        FeatureCache(tmp_path)
