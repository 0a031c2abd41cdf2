"""Augmentation: determinism under (seed, epoch, key), measured effects of each augmentation, config errors."""
from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from whisper_lora import augment as aug
from whisper_lora.constants import N_SAMPLES, SAMPLE_RATE
from whisper_lora.augment import (AugmentConfig, Augmenter, NoiseConfig, ShiftConfig, SpecAugmentConfig, SpeedConfig,
                                  VolumeConfig, apply_masks, content_frames, load_augment_config, speed_perturb,
                                  stable_hash, time_shift)
from whisper_lora.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def speech_like(seconds: float = 1.0, seed: int = 0, level: float = 0.1) -> np.ndarray:
    """Amplitude-modulated white noise: broadband, so every augmentation visibly changes it."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * np.arange(n) / SAMPLE_RATE)
    return (level * envelope * rng.standard_normal(n)).astype(np.float32)


def snr_db(clean: np.ndarray, noisy: np.ndarray) -> float:
    noise = noisy.astype(np.float64) - clean
    return 10 * np.log10(np.mean(np.square(clean, dtype=np.float64)) / np.mean(noise ** 2))


@pytest.fixture
def noise_dir(tmp_path) -> Path:
    folder = tmp_path / "noises"
    folder.mkdir()
    rng = np.random.default_rng(1)
    sf.write(folder / "white.wav", (0.2 * rng.standard_normal(2 * SAMPLE_RATE)).astype(np.float32), SAMPLE_RATE,
             subtype="FLOAT")
    # Shorter than the clips: exercises the tiling path.
    sf.write(folder / "hum.flac", 0.3 * np.sin(2 * np.pi * 120 * np.arange(4000) / SAMPLE_RATE), SAMPLE_RATE)
    return folder


@pytest.fixture(scope="module")
def log_mel_3s() -> np.ndarray:
    """Real Whisper features of a 3 s clip: 300 frames of content, 2700 of padding at the floor."""
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor()
    audio = speech_like(3.0, seed=5)
    return extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features[0]


def everything(noise: Path) -> AugmentConfig:
    return AugmentConfig(speed=SpeedConfig(p=1.0, factors=(0.9, 1.1)), volume=VolumeConfig(p=1.0),
                         noise=NoiseConfig(dir=str(noise), p=1.0), shift=ShiftConfig(p=1.0),
                         spec_augment=SpecAugmentConfig(p=1.0))


# ------------------------------------------------------------------------------------------ determinism


def test_same_seed_epoch_and_key_give_identical_output_in_fresh_and_pickled_augmenters(noise_dir, log_mel_3s):
    clip = speech_like()
    first = Augmenter(everything(noise_dir), seed=7)
    a = first.audio(clip, "clips/a.wav", epoch=2)
    # A fresh instance (a resumed run) and a pickled one with a warm noise cache (a DataLoader worker).
    for other in (Augmenter(everything(noise_dir), seed=7), pickle.loads(pickle.dumps(first))):
        np.testing.assert_array_equal(other.audio(clip, "clips/a.wav", epoch=2), a)
        np.testing.assert_array_equal(other.features(log_mel_3s, "clips/a.wav", epoch=2),
                                      first.features(log_mel_3s, "clips/a.wav", epoch=2))
    assert not np.array_equal(a, clip)


def test_key_hash_is_a_fixed_function_of_the_key_not_pythons_salted_hash():
    # Known answers: blake2b is the same in every process, on every machine and Python version; hash() is
    # salted per process, so workers, ranks and a resumed run would each draw different augmentations.
    assert stable_hash("clips/a.wav") == 7938430684284896978
    assert stable_hash("语音/片段 1.flac") == 11753533330469607526


def test_different_epoch_key_or_seed_gives_different_output(noise_dir, log_mel_3s):
    clip = speech_like()
    augmenter = Augmenter(everything(noise_dir), seed=7)
    base = augmenter.audio(clip, "a", 0)
    assert not np.array_equal(augmenter.audio(clip, "a", 1), base)
    assert not np.array_equal(augmenter.audio(clip, "b", 0), base)
    assert not np.array_equal(Augmenter(everything(noise_dir), seed=8).audio(clip, "a", 0), base)
    masked = augmenter.features(log_mel_3s, "a", 0)
    assert not np.array_equal(augmenter.features(log_mel_3s, "a", 1), masked)
    assert not np.array_equal(augmenter.features(log_mel_3s, "b", 0), masked)


def test_turning_one_augmentation_off_leaves_the_others_draws_alone():
    clip = speech_like()
    volume_only = Augmenter(AugmentConfig(volume=VolumeConfig(p=1.0)), seed=1).audio(clip, "k", 0)
    with_shift_off = Augmenter(AugmentConfig(volume=VolumeConfig(p=1.0), shift=ShiftConfig(p=0.0)), seed=1)
    np.testing.assert_array_equal(with_shift_off.audio(clip, "k", 0), volume_only)


def test_augmentations_fire_independently_of_each_other(log_mel_3s):
    augmenter = Augmenter(AugmentConfig(volume=VolumeConfig(p=0.5), spec_augment=SpecAugmentConfig(p=0.5)), seed=0)
    clip = speech_like(0.1)
    fired = [(augmenter.audio(clip, f"k{i}", 0) is not clip,
              augmenter.features(log_mel_3s, f"k{i}", 0) is not log_mel_3s) for i in range(200)]
    assert sum(a and not b for a, b in fired) > 20 and sum(b and not a for a, b in fired) > 20


def test_probability_zero_and_empty_config_are_the_identity(noise_dir, log_mel_3s):
    clip = speech_like()
    off = AugmentConfig(speed=SpeedConfig(p=0.0), volume=VolumeConfig(p=0.0),
                        noise=NoiseConfig(dir=str(noise_dir), p=0.0), shift=ShiftConfig(p=0.0),
                        spec_augment=SpecAugmentConfig(p=0.0))
    for config in (off, AugmentConfig()):
        augmenter = Augmenter(config, seed=0)
        for epoch in range(5):
            assert augmenter.audio(clip, f"k{epoch}", epoch) is clip
            assert augmenter.features(log_mel_3s, f"k{epoch}", epoch) is log_mel_3s
    assert not AugmentConfig().enabled and off.enabled
    assert Augmenter(AugmentConfig(), seed=0).describe() == "augment: off"


def test_probability_is_honoured_per_clip():
    augmenter = Augmenter(AugmentConfig(volume=VolumeConfig(p=0.3)), seed=0)
    clip = speech_like(0.1)
    fired = sum(augmenter.audio(clip, f"k{i}", 0) is not clip for i in range(400))
    assert 90 <= fired <= 150  # binomial(400, 0.3): mean 120, sd 9


# --------------------------------------------------------------------------------------------- effects


def test_volume_changes_rms_by_a_db_amount_inside_the_range():
    augmenter = Augmenter(AugmentConfig(volume=VolumeConfig(p=1.0, min_db=-6, max_db=3)), seed=0)
    clip = speech_like()
    rms = np.sqrt(np.mean(clip.astype(np.float64) ** 2))
    gains = []
    for i in range(30):
        out = augmenter.audio(clip, f"k{i}", 0)
        gains.append(20 * np.log10(np.sqrt(np.mean(out.astype(np.float64) ** 2)) / rms))
        # A pure gain: the waveform is the input scaled, not reshaped.
        np.testing.assert_allclose(out, clip * 10 ** (gains[-1] / 20), rtol=1e-5, atol=1e-7)
    assert all(-6 - 1e-4 <= g <= 3 + 1e-4 for g in gains)
    assert max(gains) - min(gains) > 4  # drawn across the range, not one fixed gain


def test_clipping_only_when_the_gain_would_exceed_full_scale():
    loud = speech_like(level=0.4)
    loud[100] = 0.9
    out = Augmenter(AugmentConfig(volume=VolumeConfig(p=1.0, min_db=6, max_db=6)), seed=0).audio(loud, "k", 0)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    assert np.abs(out).max() == 1.0 and out[100] == 1.0
    quiet = speech_like(level=0.01)
    out = Augmenter(AugmentConfig(volume=VolumeConfig(p=1.0, min_db=6, max_db=6)), seed=0).audio(quiet, "k", 0)
    np.testing.assert_allclose(out, quiet * 10 ** (6 / 20), rtol=1e-6)  # no limiter, no clipping


@pytest.mark.parametrize("snr", [0.0, 5.0, 12.5, 20.0])
def test_noise_is_added_at_the_requested_snr(noise_dir, snr):
    augmenter = Augmenter(AugmentConfig(noise=NoiseConfig(dir=str(noise_dir), p=1.0, min_snr_db=snr, max_snr_db=snr)),
                          seed=0)
    clean = speech_like(1.5)
    for i in range(6):  # both files get picked: the 2 s white noise and the looped 0.25 s hum
        out = augmenter.audio(clean, f"k{i}", 0)
        assert out.dtype == np.float32 and len(out) == len(clean)
        assert abs(snr_db(clean, out) - snr) < 0.5


def test_noise_snr_is_drawn_inside_the_range_and_noise_excerpts_vary(noise_dir):
    augmenter = Augmenter(AugmentConfig(noise=NoiseConfig(dir=str(noise_dir), p=1.0, min_snr_db=5, max_snr_db=20)),
                          seed=0)
    clean = speech_like()
    snrs = [snr_db(clean, augmenter.audio(clean, f"k{i}", 0)) for i in range(20)]
    assert all(4.5 < s < 20.5 for s in snrs) and max(snrs) - min(snrs) > 5


def test_an_undecodable_noise_file_is_skipped_for_the_next_one(tmp_path):
    folder = tmp_path / "noises"
    folder.mkdir()
    (folder / "a_broken.wav").write_bytes(b"RIFF....not a wave file at all")
    sf.write(folder / "b_good.wav", np.random.default_rng(0).standard_normal(SAMPLE_RATE) * 0.1, SAMPLE_RATE)
    augmenter = Augmenter(AugmentConfig(noise=NoiseConfig(dir=str(folder), p=1.0, min_snr_db=10, max_snr_db=10)),
                          seed=0)
    clean = speech_like()
    with pytest.warns(UserWarning, match="a_broken.wav"):
        outs = [augmenter.audio(clean, f"k{i}", 0) for i in range(10)]
    assert all(abs(snr_db(clean, out) - 10) < 0.5 for out in outs)


def test_noise_cache_stays_within_its_byte_budget(noise_dir, monkeypatch):
    monkeypatch.setattr(aug, "NOISE_CACHE_BYTES", 2 * SAMPLE_RATE * 4)  # room for the 2 s file or the hum, not both
    augmenter = Augmenter(AugmentConfig(noise=NoiseConfig(dir=str(noise_dir), p=1.0)), seed=0)
    for i in range(20):
        augmenter.audio(speech_like(0.5), f"k{i}", 0)
        assert augmenter._noise_cache_bytes <= aug.NOISE_CACHE_BYTES
        assert augmenter._noise_cache_bytes == sum(a.nbytes for a in augmenter._noise_cache.values())


def test_speed_factor_changes_length_and_pitch_kaldi_style():
    n = SAMPLE_RATE * 2
    tone = (0.5 * np.sin(2 * np.pi * 400 * np.arange(n) / SAMPLE_RATE)).astype(np.float32)
    fast = speed_perturb(tone, 1.1)
    assert abs(len(fast) - n / 1.1) <= 1 and fast.dtype == np.float32
    spectrum = np.abs(np.fft.rfft(fast[1000:-1000] * np.hanning(len(fast) - 2000)))
    peak_hz = np.argmax(spectrum) * SAMPLE_RATE / (len(fast) - 2000)
    assert abs(peak_hz - 440) < 2  # 400 Hz played 1.1× faster
    assert abs(len(speed_perturb(tone, 0.9)) - n / 0.9) <= 1
    out = Augmenter(AugmentConfig(speed=SpeedConfig(p=1.0, factors=(1.1,))), seed=0).audio(tone, "k", 0)
    np.testing.assert_array_equal(out, fast)


def test_time_shift_moves_a_click_by_the_requested_samples():
    clip = np.zeros(SAMPLE_RATE, np.float32)
    clip[8000] = 0.5
    later = time_shift(clip, 4000)
    assert len(later) == SAMPLE_RATE + 4000 and np.flatnonzero(later).tolist() == [12000]
    earlier = time_shift(clip, -4000)
    assert len(earlier) == SAMPLE_RATE - 4000 and np.flatnonzero(earlier).tolist() == [4000]


def test_augmenter_shift_is_within_range_both_ways_and_never_cuts_the_first_sound():
    config = AugmentConfig(shift=ShiftConfig(p=1.0, max_seconds=0.5))
    augmenter = Augmenter(config, seed=0)
    clip = np.zeros(SAMPLE_RATE, np.float32)
    clip[int(0.6 * SAMPLE_RATE)] = 0.5
    moves = []
    for i in range(40):
        out = augmenter.audio(clip, f"k{i}", 0)
        (position,) = np.flatnonzero(out)
        move = position - int(0.6 * SAMPLE_RATE)
        assert len(out) == len(clip) + move  # padded or trimmed at the start only
        assert out[position] == 0.5
        moves.append(move)
    assert all(abs(m) <= 0.5 * SAMPLE_RATE for m in moves)
    assert min(moves) < -0.2 * SAMPLE_RATE and max(moves) > 0.2 * SAMPLE_RATE
    # A click only 0.1 s in: leading silence is all that may go, keeping the 20 ms margin before it.
    early = np.zeros(SAMPLE_RATE, np.float32)
    early[1600] = 0.5
    positions = [int(np.flatnonzero(augmenter.audio(early, f"k{i}", 0))[0]) for i in range(40)]
    assert min(positions) == aug.ONSET_MARGIN


def test_no_augmentation_makes_a_clip_longer_than_30_seconds(noise_dir):
    long = speech_like(29.5)
    slow = AugmentConfig(speed=SpeedConfig(p=1.0, factors=(0.9,)))
    # 29.5 s / 0.9 = 32.8 s: the speed change is skipped for this clip, applied to a shorter one.
    assert Augmenter(slow, seed=0).audio(long, "k", 0) is long
    assert abs(len(Augmenter(slow, seed=0).audio(speech_like(10.0), "k", 0)) - 10.0 * SAMPLE_RATE / 0.9) <= 1
    shifting = Augmenter(AugmentConfig(speed=SpeedConfig(p=1.0, factors=(0.9, 1.0)),
                                       shift=ShiftConfig(p=1.0, max_seconds=2.0)), seed=0)
    full = speech_like(30.0)
    lengths = [len(shifting.audio(clip, f"k{i}", 0)) for clip in (long, full) for i in range(15)]
    assert max(lengths) == N_SAMPLES  # shifts pad up to the limit, never past it
    assert len(time_shift(full, 5 * SAMPLE_RATE)) == N_SAMPLES


def test_spec_augment_masks_exactly_the_given_bands_and_frames():
    mel = np.random.default_rng(0).uniform(-1, 1, (80, 3000)).astype(np.float32)
    out = apply_masks(mel, bands=[(10, 5), (70, 0)], spans=[(100, 20), (110, 20)], value=7.0)
    rows = np.flatnonzero((out == 7.0).all(axis=1))
    cols = np.flatnonzero((out == 7.0).all(axis=0))
    assert rows.tolist() == list(range(10, 15))  # a zero-width band masks nothing
    assert cols.tolist() == list(range(100, 130))  # overlapping spans: their union
    keep = np.ones_like(mel, bool)
    keep[rows, :] = False
    keep[:, cols] = False
    np.testing.assert_array_equal(out[keep], mel[keep])
    assert (mel != 7.0).all()  # the input is not modified


def test_augmenter_spec_augment_masks_whole_bands_and_frames_inside_the_clip(log_mel_3s):
    assert content_frames(log_mel_3s) in range(299, 303)  # 3 s = 300 frames; padding after is the floor
    config = SpecAugmentConfig(p=1.0, freq_masks=2, freq_width=27, time_masks=2, time_width=100)
    augmenter = Augmenter(AugmentConfig(spec_augment=config), seed=0)
    frames = content_frames(log_mel_3s)
    fill = log_mel_3s[:, :frames].mean()
    total_rows = total_cols = 0
    for i in range(20):
        out = augmenter.features(log_mel_3s, f"k{i}", 0)
        assert out.shape == log_mel_3s.shape and out.dtype == log_mel_3s.dtype
        changed = out != log_mel_3s
        rows = np.flatnonzero((out == np.float32(fill)).all(axis=1))
        cols = np.flatnonzero((out == np.float32(fill)).all(axis=0))
        # Every changed cell lies in a fully masked band or frame, and holds the clip's mean.
        covered = np.zeros_like(changed)
        covered[rows, :] = True
        covered[:, cols] = True
        assert not (changed & ~covered).any()
        assert np.allclose(out[changed], fill)
        assert len(rows) <= 2 * 27
        assert len(cols) <= 2 * int(0.2 * frames) and (cols < frames).all()  # time masks stay out of the padding
        total_rows += len(rows)
        total_cols += len(cols)
    assert total_rows > 20 * 27 * 0.5 and total_cols > 20 * 60 * 0.5  # widths ~ U[0, max]: means 27 and 60 per clip


# ----------------------------------------------------------------------------------------------- config


def write(tmp_path: Path, text: str, name: str = "aug.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_example_config_loads_and_describes_itself():
    config = load_augment_config(REPO / "configs" / "augment-example.yaml")
    assert config.speed == SpeedConfig(p=0.5, factors=(0.9, 1.0, 1.1))
    assert config.volume == VolumeConfig(p=0.5, min_db=-6.0, max_db=6.0)
    assert config.shift == ShiftConfig(p=0.3, max_seconds=0.5)
    assert config.spec_augment == SpecAugmentConfig(p=0.5, freq_masks=2, freq_width=27, time_masks=2, time_width=100)
    assert config.noise is None
    text = Augmenter(config, seed=0).describe()
    assert "speed" in text and "spec_augment" in text and "noise" not in text


def test_noise_dir_resolves_against_the_yaml_folder(tmp_path, noise_dir, monkeypatch):
    (tmp_path / "configs").mkdir()
    path = write(tmp_path / "configs", "noise: {p: 1, dir: ../noises, min_snr_db: 3, max_snr_db: 9}\nshift: null\n")
    monkeypatch.chdir(REPO)  # anywhere but the YAML's folder
    config = load_augment_config(path)
    assert Path(config.noise.dir).resolve() == noise_dir.resolve() and config.shift is None
    assert config.noise == NoiseConfig(dir=config.noise.dir, p=1.0, min_snr_db=3.0, max_snr_db=9.0)
    assert "2 files" in Augmenter(config, seed=0).describe()


def test_resolved_config_round_trips_through_yaml(tmp_path, noise_dir):
    import yaml

    config = load_augment_config(REPO / "configs" / "augment-example.yaml")
    config = dataclasses.replace(config, noise=NoiseConfig(dir=str(noise_dir), p=0.25))
    path = write(tmp_path, yaml.safe_dump(config.as_dict()), "resolved.yaml")
    assert load_augment_config(path) == config


def test_empty_yaml_is_no_augmentation(tmp_path):
    assert load_augment_config(write(tmp_path, "# nothing yet\n")) == AugmentConfig()


@pytest.mark.parametrize("text,key", [
    ("pitch: {p: 0.5}", "pitch"),
    ("volume: {p: 0.5, gain: 3}", "volume.gain"),
    ("speed: {p: 1.5}", "speed.p"),
    ("shift: {p: -0.1}", "shift.p"),
    ("spec_augment: {p: high}", "spec_augment.p"),
    ("volume: {min_db: 6, max_db: -6}", "volume.min_db"),
    ("noise: {dir: NOISES, min_snr_db: 20, max_snr_db: 5}", "noise.min_snr_db"),
    ("noise: {p: 0.5}", "noise.dir"),
    ("noise: {dir: does-not-exist}", "noise.dir"),
    ("noise: {dir: EMPTY}", "noise.dir"),
    ("noise: {dir: BROKEN}", "noise.dir"),
    ("speed: {factors: [0.9, 0]}", "speed.factors"),
    ("speed: {factors: [-1.1]}", "speed.factors"),
    ("speed: {factors: []}", "speed.factors"),
    ("shift: {max_seconds: 45}", "shift.max_seconds"),
    ("spec_augment: {freq_masks: -1}", "spec_augment.freq_masks"),
    ("spec_augment: {time_width: 2.5}", "spec_augment.time_width"),
    ("volume: [1, 2]", "volume"),
    ("volume: {max_db: .nan}", "volume.max_db"),
])
def test_config_errors_name_the_file_and_the_key(tmp_path, noise_dir, text, key):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no audio here")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.wav").write_bytes(b"not audio")
    text = text.replace("NOISES", str(noise_dir)).replace("EMPTY", "empty").replace("BROKEN", "broken")
    path = write(tmp_path, text + "\n")
    with pytest.raises(UserError) as caught:
        load_augment_config(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: {key}") or message.startswith(f"{path}: {key.split('.')[0]}: ")
    assert key in message


@pytest.mark.parametrize("text", ["[speed, volume]", "speed: {p: [0.5\n"])
def test_malformed_yaml_names_the_file(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(UserError, match=str(path)):
        load_augment_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_augment_config(tmp_path / "nope.yaml")
