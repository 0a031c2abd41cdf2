import av
import numpy as np
import pytest
import soundfile as sf

from conftest import SPEECH_EN, write_tone
from whisper_lora.audio import audio_duration, load_audio, load_window
from whisper_lora.constants import SAMPLE_RATE
from whisper_lora.errors import AudioError


def encode_with_pyav(path, codec, seconds=1.0, rate=44100, layout="stereo"):
    """Write a 440 Hz tone with FFmpeg's encoders (MP3, AAC in M4A, Opus in WebM)."""
    t = np.arange(int(seconds * rate)) / rate
    wave = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate, layout=layout)
        channels = 2 if layout == "stereo" else 1
        frame_size = stream.codec_context.frame_size or 1024
        planar = np.tile(wave, (channels, 1))
        for start in range(0, planar.shape[1], frame_size):
            chunk = np.ascontiguousarray(planar[:, start:start + frame_size])
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
            frame.sample_rate = rate
            frame.pts = start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


@pytest.mark.parametrize("suffix,kwargs", [(".wav", {}), (".flac", {}), (".ogg", {"format": "OGG", "subtype": "OPUS"})])
def test_soundfile_formats_any_rate_and_channels_become_16k_mono(tmp_path, suffix, kwargs):
    path = write_tone(tmp_path / f"tone{suffix}", seconds=1.0, rate=48000, channels=2, **kwargs)
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - SAMPLE_RATE) < 400  # Opus adds a little pre-skip padding
    assert 0.15 < np.abs(audio).max() < 0.4


@pytest.mark.parametrize("name,codec", [("tone.mp3", "libmp3lame"), ("tone.m4a", "aac"), ("tone.webm", "libopus")])
def test_ffmpeg_formats_decode(tmp_path, name, codec):
    rate = 48000 if codec == "libopus" else 44100
    path = encode_with_pyav(tmp_path / name, codec, rate=rate)
    audio = load_audio(path)
    assert abs(len(audio) / SAMPLE_RATE - 1.0) < 0.1
    # A 440 Hz tone survives: its spectral peak is within one FFT bin of 440 Hz.
    spectrum = np.abs(np.fft.rfft(audio[2000:2000 + 8000]))
    assert abs(np.argmax(spectrum) * SAMPLE_RATE / 8000 - 440) <= 2


def test_raw_pcm_is_16k_16bit_mono(tmp_path):
    pcm = (np.sin(np.arange(8000) / 10) * 10000).astype("<i2")
    path = tmp_path / "clip.pcm"
    pcm.tofile(path)
    audio = load_audio(path)
    assert len(audio) == 8000
    np.testing.assert_allclose(audio, pcm / 32768.0, atol=1e-6)


def test_offsets_select_a_span(tmp_path):
    rate = 8000
    data = np.concatenate([np.zeros(rate), np.full(rate, 0.5)]).astype(np.float32)
    path = tmp_path / "steps.wav"
    sf.write(path, data, rate)
    second = load_audio(path, start=1.0, end=2.0)
    assert abs(len(second) - SAMPLE_RATE) <= 2
    assert second[100:-100].mean() > 0.45
    first = load_audio(path, end=1.0)
    assert abs(first[100:-100]).max() < 0.05


def test_a_sample_must_fit_one_window_but_a_span_of_a_long_file_may(tmp_path):
    long = write_tone(tmp_path / "long.wav", seconds=31.0)
    with pytest.raises(AudioError, match=r"long\.wav: 31\.0 s is longer than Whisper's 30 s window"):
        load_window(long)
    assert len(load_window(long, start=2.0, end=31.0)) == 29 * SAMPLE_RATE
    assert len(load_audio(long)) == 31 * SAMPLE_RATE  # plain decoding (transcribe) has no limit


def test_real_speech_duration(tmp_path):
    audio = load_audio(SPEECH_EN / "arctic_a0007.wav")
    assert abs(len(audio) / SAMPLE_RATE - audio_duration(SPEECH_EN / "arctic_a0007.wav")) < 0.01


def test_missing_file(tmp_path):
    with pytest.raises(AudioError, match="nope.wav: audio file not found") as exc:
        load_audio(tmp_path / "nope.wav")
    assert exc.value.kind == "missing_audio"


def test_empty_file(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioError, match=r"empty.wav: audio file is empty \(0 bytes\)") as exc:
        load_audio(tmp_path / "empty.wav")
    assert exc.value.kind == "empty_audio"


def test_corrupt_file(tmp_path):
    (tmp_path / "junk.mp3").write_bytes(b"this is not audio at all" * 50)
    with pytest.raises(AudioError, match="junk.mp3: cannot decode audio") as exc:
        load_audio(tmp_path / "junk.mp3")
    assert exc.value.kind == "undecodable_audio"


def test_zero_samples(tmp_path):
    path = tmp_path / "zero.wav"
    sf.write(path, np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioError, match="zero.wav: audio has zero samples"):
        load_audio(path)


def test_nan_samples(tmp_path):
    path = tmp_path / "nan.wav"
    data = np.zeros(1600, np.float32)
    data[10] = np.nan
    sf.write(path, data, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="nan.wav: audio contains NaN") as exc:
        load_audio(path)
    assert exc.value.kind == "non_finite_audio"


def test_the_kind_of_problem_travels_with_the_error_across_processes(tmp_path):
    """The data doctor classifies problems by `kind` in worker processes: pickling keeps it and the path."""
    import pickle

    sf.write(tmp_path / "a.wav", np.zeros(16000 * 3, np.float32), 16000)
    with pytest.raises(AudioError) as exc:
        load_audio(tmp_path / "a.wav", start=2.0, end=1.0)
    again = pickle.loads(pickle.dumps(exc.value))
    assert (again.kind, again.path, str(again)) == ("bad_span", exc.value.path, str(exc.value))
    assert again.message == "end time 1.0 s is not after start time 2.0 s"


def test_duration_probe_reports_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioError, match="empty.wav: audio file is empty"):
        audio_duration(tmp_path / "empty.wav")
    with pytest.raises(AudioError, match="gone.wav: audio file not found"):
        audio_duration(tmp_path / "gone.wav")
