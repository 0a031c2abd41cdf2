"""The window algorithms on scripted model output: which windows are decoded, and what they yield when."""
import numpy as np
import pytest

from whisper_lora.decode import GREEDY, DecodeOptions, TransformersBackend, longform
from whisper_lora.decode.search import WindowResult
from whisper_lora.models import load_model


@pytest.fixture(scope="module")
def tiny_backend(tiny_model_dir):
    return TransformersBackend(*load_model(str(tiny_model_dir)), device="cpu")


def test_vad_decodes_again_what_a_window_left_out(tiny_backend, monkeypatch):
    """Whisper may close a dense VAD window early; the speech after its last segment is decoded again
    in a new window, and every segment is timed in the original audio, inside the speech."""
    from whisper_lora import vad

    backend, tokens = tiny_backend, tiny_backend.tokens
    monkeypatch.setattr(vad, "speech_regions", lambda audio: [vad.SpeechRegion(2.0, 4.0), vad.SpeechRegion(6.0, 8.0)])
    monkeypatch.setattr(backend, "align", lambda *args: [])  # random weights: no alignment
    hello = tokens.text_ids(" hello")
    windows, stop_after = [], {"seconds": 3.0}

    def decode(encoded, prefixes, options, timestamps, adapter=None):
        windows.append(encoded.shape[0])
        end = tokens.timestamp_begin + round(stop_after["seconds"] / 0.02)
        return [WindowResult([tokens.timestamp_begin, *hello, end], -0.1, 0.01, 1.0, 0.0) for _ in prefixes]

    monkeypatch.setattr(backend, "decode", decode)
    audio = (np.random.default_rng(0).standard_normal(16000 * 10) * 0.1).astype(np.float32)
    # The two regions and the 2 s pause between them (kept whole) make one window: 1 s to 9 s.
    # Each attempt stops 3 s in: after the first region, then 1 s into the second, then at its end.
    segments = list(backend.transcribe(audio, "en", GREEDY, vad=True)[0])
    assert windows == [1] * (1 + longform.VAD_RETRY_ROUNDS)
    assert [(s.start, s.end, s.text) for s in segments] == [(2.0, 4.0, "hello"), (6.0, 7.0, "hello"),
                                                            (7.0, 8.0, "hello")]
    windows.clear()
    stop_after["seconds"] = 8.0  # the whole window decoded: nothing to retry
    segments = list(backend.transcribe(audio, "en", GREEDY, vad=True)[0])
    assert windows == [1] and [(s.start, s.end) for s in segments] == [(2.0, 8.0)]


def test_long_audio_is_read_in_blocks_and_yielded_window_by_window(tiny_backend, monkeypatch):
    """Each window closes a segment every 7 s and stops at its last full one. A block never lets a
    window cross its edge: windows are whole 30 s until the input's end, no time is skipped or decoded
    twice across blocks, at most BLOCK_SECONDS is read at once, and each window's segments come out
    before the next window is decoded."""
    backend, tokens = tiny_backend, tiny_backend.tokens
    word = tokens.text_ids(" word")
    events, reads = [], []
    duration = 11 * 60.0  # three blocks of 300 s

    def decode(encoded, prefixes, options, timestamps, adapter=None):
        events.append("decode")
        stamp = [tokens.timestamp_begin + round(t / 0.02) for t in (0, 7, 14, 21, 28)]
        # <|0.00|> word <|7.00|><|7.00|> word … <|28.00|><|28.00|>: the window ends unfinished at 28 s
        sampled = [stamp[0]] + [t for s in stamp[1:] for t in (*word, s, s)]
        return [WindowResult(sampled, -0.1, 0.01, 1.0, 0.0)]

    read_block = longform.read_block

    def read(source, start, end):
        reads.append(end - start)
        return read_block(source, start, end)

    monkeypatch.setattr(backend, "decode", decode)
    monkeypatch.setattr(longform, "read_block", read)
    audio = np.full(int(duration * 16000), 0.05, np.float32)  # loud enough not to count as silence
    segments, info = backend.transcribe(audio, "en", DecodeOptions(temperature=(0.0,)))
    for segment in segments:
        events.append(segment.start)
    starts = [e for e in events if e != "decode"]
    assert max(reads) <= longform.BLOCK_SECONDS
    whole = int((duration - 30) // 7)  # segments of the whole windows, before the input's short last one
    assert starts[:whole] == [7.0 * k for k in range(whole)]  # every 7 s, across both block edges, once
    assert starts == sorted(starts) and duration - 30 < starts[-1] <= duration
    # window by window: four segments after each decode, never all at the end
    assert events[:10] == ["decode", 0.0, 7.0, 14.0, 21.0, "decode", 28.0, 35.0, 42.0, 49.0]
