import numpy as np
import pytest

from conftest import SHARED_EN
from whisper_lora.audio import load_audio
from whisper_lora.inference import Transcriber
from whisper_lora.models import load_model
from whisper_lora.text import error_rate


@pytest.fixture(scope="module")
def base_transcriber(base_model_dir):
    model, processor = load_model(str(base_model_dir))
    return Transcriber(model, processor, device="cpu")


def test_batch_decoding_detects_english(base_transcriber):
    clips = [load_audio(SHARED_EN / "arctic_a0009.wav"), load_audio(SHARED_EN / "cards" / "001.wav")]
    decoded = base_transcriber.decode_batch(clips)
    assert [d.language for d in decoded] == ["en", "en"]
    assert all(d.language_probability > 0.5 for d in decoded)
    assert error_rate(["He turned sharply, and faced Gregson across the table.", "ten of clubs"],
                      [d.text for d in decoded], "wer") < 0.2


def test_long_audio_is_chunked_not_truncated(base_transcriber):
    speech = load_audio(SHARED_EN / "arctic_a0009.wav")
    gap = np.zeros(16000 * 6, np.float32)
    audio = np.concatenate([speech, gap] * 4 + [load_audio(SHARED_EN / "cards" / "005.wav")])  # ~40 s
    assert len(audio) / 16000 > 35
    segments, info = base_transcriber.transcribe(audio, language="en")
    assert info.duration == pytest.approx(len(audio) / 16000)
    segments = list(segments)
    text = " ".join(s.text for s in segments).lower()
    assert text.count("gregson") >= 3
    assert "spades" in text  # the clip after the 30 s mark is transcribed
    starts = [s.start for s in segments]
    assert starts == sorted(starts) and all(0 <= s.start < s.end <= info.duration + 0.01 for s in segments)


def test_transcribe_returns_a_lazy_iterator(base_transcriber):
    segments, info = base_transcriber.transcribe(load_audio(SHARED_EN / "cards" / "003.wav"))
    assert info.language == "en"
    assert iter(segments) is segments  # a generator: nothing decoded until consumed
    (segment,) = list(segments)
    assert "clubs" in segment.text.lower()
