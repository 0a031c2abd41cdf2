"""`--audio-ctx`: the encoder fed only the frames that hold audio (audio_ctx.py and the decoding core)."""
from __future__ import annotations

import copy
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import SPEECH_EN, assert_one_line_error, cli_here
from whisper_lora.audio import load_audio
from whisper_lora.audio_ctx import AUTO, AUTO_FLOOR_SECONDS, FULL, encoder_frames, parse_audio_ctx
from whisper_lora.constants import FRAMES_PER_SECOND, N_FRAMES
from whisper_lora.decode import CT2Backend, DecodeOptions, TransformersBackend
from whisper_lora.decode.rules import LogitRules
from whisper_lora.errors import UserError
from whisper_lora.models import ct2_model_dir, load_model
from whisper_lora.serve.service import ModelPool, TranscriptionService

from test_service import run_together

WORDS = DecodeOptions(word_timestamps=True)


def test_contexts_cover_the_audio_in_whole_seconds_above_the_floor():
    floor = round(AUTO_FLOOR_SECONDS * FRAMES_PER_SECOND)
    assert encoder_frames(300, FULL) == encoder_frames(300, None) == N_FRAMES
    assert encoder_frames(300, AUTO) == floor  # a 3 s clip: the floor
    assert encoder_frames(floor, AUTO) == floor + 100  # audio plus its margin, rounded up to a whole second
    assert encoder_frames(1234, AUTO) == 1400
    assert encoder_frames(2950, AUTO) == N_FRAMES  # never past Whisper's window
    assert encoder_frames(300, 4.0) == 400 and encoder_frames(650, 4.0) == 800  # a number is auto's floor
    for frames in range(0, N_FRAMES + 1, 37):
        for setting in (AUTO, 2.5, 7.3):
            context = encoder_frames(frames, setting)
            assert context % 2 == 0 and min(frames, N_FRAMES) <= context <= N_FRAMES  # speech is never cut


def test_settings_are_read_as_users_type_them_and_nonsense_is_refused_in_one_line(capsys):
    assert parse_audio_ctx(" Auto ") == AUTO and parse_audio_ctx("full") == FULL
    assert parse_audio_ctx("default") is None and parse_audio_ctx(None) is None  # each path's own default
    assert parse_audio_ctx("7.5") == 7.5 and parse_audio_ctx("10s") == 10.0 and parse_audio_ctx(5) == 5.0
    for bad in ("half", "0.5", "31", "nan", "-3"):
        with pytest.raises(UserError, match="audio-ctx"):
            parse_audio_ctx(bad)
    result = cli_here(capsys, "transcribe", str(SPEECH_EN / "arctic_a0009.wav"), "--audio-ctx", "0.2")
    assert_one_line_error(result, "--audio-ctx 0.2", "seconds between")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, processor = load_model(str(tiny_model_dir))
    return TransformersBackend(model, processor, device="cpu")


@pytest.mark.parametrize("frames", [N_FRAMES, 1000, 400])
def test_a_sliced_encoder_is_transformers_encoder_of_a_model_with_that_context(tiny, frames):
    """Cutting the input to N frames and the positional embeddings to N/2 is exactly Whisper's encoder
    built for an N-frame window: transformers' own WhisperEncoder, given a config that long, agrees.
    (It is not the full encoder's output on the first positions: self-attention sees every position.)"""
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    encoder = tiny.network.encoder
    config = copy.deepcopy(encoder.config)
    config.max_source_positions = frames // 2
    reference = WhisperEncoder(config).eval()
    state = {k: (v[: frames // 2] if k == "embed_positions.weight" else v) for k, v in encoder.state_dict().items()}
    reference.load_state_dict(state)
    torch.manual_seed(1)
    features = torch.randn(2, 80, frames)
    with torch.no_grad():
        expected = reference(features).last_hidden_state
    ours = tiny.encode(features)
    assert ours.shape == (2, frames // 2, config.d_model)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    if frames < N_FRAMES:  # and not the full encoder's first positions
        full = tiny.encode(torch.nn.functional.pad(features, (0, N_FRAMES - frames)))
        assert not torch.allclose(full[:, : frames // 2], ours, atol=1e-3)


def test_no_timestamp_past_the_encoder_context_can_be_written(tiny):
    rules = LogitRules(tiny.tokens, tiny.generation_config, tiny.network.vocab_size, "cpu")
    begin = tiny.tokens.timestamp_begin
    logits = torch.zeros(1, tiny.network.vocab_size)
    logits[0, begin + 700] = 50.0  # the model wants <|14.00|> after a text token
    sampled = [[begin, tiny.tokens.text_ids(" Hello")[0]]]
    assert rules.apply(logits.clone(), sampled, False, True, 1500).argmax() == begin + 700  # full: allowed
    cut = rules.apply(logits.clone(), sampled, False, True, 500)  # a 10 s context
    assert torch.isinf(cut[0, begin + 501:]).all() and not torch.isinf(cut[0, begin + 2: begin + 501]).any()


class EncoderLog:
    """The backend's own model work, with the length of each encoder input written down."""

    def __init__(self, backend):
        self.backend, self.frames = backend, []
        self.tokens = backend.tokens

    def encode(self, features, adapter=None):
        self.frames.append(features.shape[-1])
        return self.backend.encode(features, adapter)

    def __getattr__(self, name):
        return getattr(self.backend, name)


@pytest.fixture(scope="module")
def base(base_model_dir):
    model, processor = load_model(str(base_model_dir))
    return TransformersBackend(model, processor, device="cpu")


def test_auto_reads_a_short_clip_as_full_does_with_a_third_of_the_encoder(base):
    """whisper-base as released, a 3.1 s clip: `auto` encodes the floor (10 s), `full` 30 s; the words and
    their times (alignment heads + DTW over the shorter encoder output) agree, and every timestamp lies
    inside the audio."""
    clip = load_audio(SPEECH_EN / "arctic_a0009.wav")
    results = {}
    for setting in (FULL, AUTO):
        log = EncoderLog(base)
        segments, _ = base.batched(log).transcribe(clip, "en", replace(WORDS, audio_ctx=setting))
        results[setting] = (list(segments), log.frames)
    (full, full_frames), (auto, auto_frames) = results[FULL], results[AUTO]
    assert full_frames == [N_FRAMES] and auto_frames == [encoder_frames(len(clip) // 160 + 1, AUTO)]
    assert auto_frames[0] <= N_FRAMES // 3
    assert [s.text for s in auto] == [s.text for s in full]
    full_words = [w for s in full for w in s.words]
    auto_words = [w for s in auto for w in s.words]
    assert [w.word for w in auto_words] == [w.word for w in full_words]
    assert max(abs(a.start - f.start) + abs(a.end - f.end) for a, f in zip(auto_words, full_words)) < 0.2
    assert all(0 <= s.start <= s.end <= len(clip) / 16000 + 0.02 for s in auto)


def test_the_ct2_backend_fits_its_encoder_too(base_model_dir):
    """faster-whisper pads every window to 30 s; the backend keeps the context's frames of it."""
    backend = CT2Backend(ct2_model_dir(None), "float32", device="cpu")
    seen = []

    class Recording:
        def __init__(self, model):
            self.model = model

        def encode(self, features, **kwargs):
            seen.append(features.shape[-1])
            return self.model.encode(features, **kwargs)

        def __getattr__(self, name):
            return getattr(self.model, name)

    backend.model.model = Recording(backend.model.model)
    clip = load_audio(SPEECH_EN / "arctic_a0009.wav")
    texts = {}
    for setting in (FULL, AUTO):
        seen.clear()
        segments, _ = backend.transcribe(clip, "en", replace(WORDS, audio_ctx=setting))
        texts[setting] = " ".join(s.text for s in segments)
        assert set(seen) == {N_FRAMES if setting == FULL else round(AUTO_FLOOR_SECONDS * FRAMES_PER_SECOND)}
    assert texts[AUTO] == texts[FULL]


def test_the_server_batches_windows_of_one_context_together_and_others_apart(tiny_model_dir):
    """Three calls at `auto`: two 2 s clips (the floor's context) share encoder and decoder batches, the
    14 s clip (a longer context) gets its own; each call reads as it does alone."""
    rng = np.random.default_rng(3)
    short = [(rng.standard_normal(16000 * 2) * 0.1).astype(np.float32) for _ in range(2)]
    long = (rng.standard_normal(16000 * 14) * 0.1).astype(np.float32)
    options = DecodeOptions(temperature=(0.0,), without_timestamps=True, max_new_tokens=8)
    service = TranscriptionService(ModelPool(str(tiny_model_dir), device="cpu"), max_wait=math.inf, audio_ctx="auto")
    try:
        def run(clip):
            segments, _ = service.transcribe(clip, None, "en", options)
            return [s.text for s in segments]

        together = run_together(service, [lambda c=c: run(c) for c in [*short, long]])
        batches = sorted((op, len(rows)) for op, rows in service.batcher.recent)
        assert batches == [("decode", 1), ("decode", 2), ("encode", 1), ("encode", 2)]
        service.batcher.recent.clear()
        assert [run(c) for c in [*short, long]] == together
    finally:
        service.close()
