import numpy as np
import pytest

from conftest import SPEECH_EN
from whisper_lora.audio import load_audio
from whisper_lora.constants import HOP_LENGTH
from whisper_lora.features import EDGE_FRAMES
from whisper_lora.decode import GREEDY, CT2Backend, DecodeOptions, TransformersBackend, join_text
from whisper_lora.models import ct2_model_dir, load_model
from whisper_lora.text import error_rate


@pytest.fixture(scope="module")
def base_transcriber(base_model_dir):
    model, processor = load_model(str(base_model_dir))
    return TransformersBackend(model, processor, device="cpu")


def decode_batch(backend, clips, languages=None, options=GREEDY):
    """(text, the one segment or None, info) per clip."""
    return [(join_text(segments, info.language), segments[0] if segments else None, info)
            for segments, info in backend.transcribe_batch(clips, languages, options)]


def test_batch_decoding_detects_english(base_transcriber):
    clips = [load_audio(SPEECH_EN / "arctic_a0009.wav"), load_audio(SPEECH_EN / "cards" / "001.wav")]
    decoded = decode_batch(base_transcriber, clips)
    assert [info.language for _, _, info in decoded] == ["en", "en"]
    assert all(info.language_probability > 0.5 for _, _, info in decoded)
    assert error_rate(["He turned sharply, and faced Gregson across the table.", "ten of clubs"],
                      [text for text, _, _ in decoded], "wer") < 0.2


def test_long_audio_is_chunked_not_truncated(base_transcriber):
    speech = load_audio(SPEECH_EN / "arctic_a0009.wav")
    gap = np.zeros(16000 * 6, np.float32)
    audio = np.concatenate([speech, gap] * 4 + [load_audio(SPEECH_EN / "cards" / "005.wav")])  # ~40 s
    assert len(audio) / 16000 > 35
    # No temperature fallback: four times the same sentence compresses like a repetition loop (gzip
    # ratio > 2.4), and a sampled retry would make this test about luck rather than about chunking.
    segments, info = base_transcriber.transcribe(audio, language="en", options=DecodeOptions(temperature=(0.0,)))
    assert info.duration == pytest.approx(len(audio) / 16000)
    segments = list(segments)
    text = " ".join(s.text for s in segments).lower()
    assert text.count("gregson") >= 3
    assert "spades" in text  # the clip after the 30 s mark is transcribed
    starts = [s.start for s in segments]
    assert starts == sorted(starts) and all(0 <= s.start < s.end <= info.duration + 0.01 for s in segments)


def test_transcribe_returns_a_lazy_iterator(base_transcriber, monkeypatch):
    encoded, decoded = [], []
    encode, decode = base_transcriber.encode, base_transcriber.decode
    monkeypatch.setattr(base_transcriber, "encode", lambda features, adapter=None: encoded.append(len(features))
                        or encode(features, adapter))
    monkeypatch.setattr(base_transcriber, "decode", lambda *args, **kwargs: decoded.append(len(args[1]))
                        or decode(*args, **kwargs))
    segments, info = base_transcriber.transcribe(load_audio(SPEECH_EN / "cards" / "003.wav"))
    assert info.language == "en"  # known before any decoding: detection ran on the first window
    assert decoded == []  # nothing decoded until the caller asks
    (segment,) = list(segments)
    assert decoded == [1]
    assert "clubs" in segment.text.lower()
    assert encoded == [1]  # language detection and decoding share one encoder pass


def test_silence_produces_no_text_without_vad(base_transcriber):
    segments, _ = base_transcriber.transcribe(np.zeros(16000 * 40, np.float32), language="en", options=DecodeOptions())
    assert list(segments) == []
    ((short, _, _),) = decode_batch(base_transcriber, [np.zeros(16000 * 5, np.float32)], ["en"], DecodeOptions())
    assert short == ""


def test_temperature_fallback_breaks_a_repetition_loop(base_transcriber):
    """whisper-base loops on this robotic Mandarin clip when greedy; the fallback retries hotter."""
    import gzip


    from conftest import DEMO

    def ratio(text):
        data = text.encode("utf-8")
        return len(data) / len(gzip.compress(data)) if data else 0.0

    clip = load_audio(DEMO / "audio" / "test_0002.ogg")
    ((greedy, _, _),) = decode_batch(base_transcriber, [clip], ["zh"], GREEDY)
    assert ratio(greedy) > 2.4, greedy  # the loop this test is about
    ((fallback, _, _),) = decode_batch(base_transcriber, [clip], ["zh"],
                                       DecodeOptions(max_new_tokens=128, without_timestamps=True))
    assert ratio(fallback) < ratio(greedy)
    assert len(fallback) < len(greedy)


def test_initial_prompt_primes_but_is_not_returned(base_transcriber):
    clip = load_audio(SPEECH_EN / "arctic_a0009.wav")
    ((decoded, _, _),) = decode_batch(base_transcriber, [clip], ["en"],
                                      DecodeOptions(initial_prompt="Inspector Gregson's notes."))
    assert "gregson" in decoded.lower()
    assert "notes" not in decoded.lower() and "inspector" not in decoded.lower()


# ---- the decoding loop, its scores and word timestamps ---------------------------------------------

@pytest.fixture(scope="module")
def ct2_transcriber(base_model_dir):
    return CT2Backend(ct2_model_dir(None), "float32", device="cpu")


def gregson_and_cards() -> np.ndarray:
    """~40 s: the same sentence four times with 6 s pauses, then a card clip after the 30 s mark."""
    speech = load_audio(SPEECH_EN / "arctic_a0009.wav")
    return np.concatenate([speech, np.zeros(16000 * 6, np.float32)] * 4 + [load_audio(SPEECH_EN / "cards" / "005.wav")])


@pytest.mark.parametrize("beams", [1, 3])
def test_decoding_loop_matches_transformers_generate_token_for_token(base_transcriber, beams):
    """The own decoding loop applies exactly transformers' suppression rules, greedy and beam search."""
    from dataclasses import replace

    import torch

    clips = [load_audio(SPEECH_EN / "arctic_a0007.wav"), load_audio(SPEECH_EN / "cards" / "002.wav")]
    ours = decode_batch(base_transcriber, clips, ["en", "en"], replace(GREEDY, num_beams=beams))
    with torch.inference_mode():
        ids = base_transcriber.model.generate(input_features=base_transcriber.features(clips), language="en",
                                              task="transcribe", num_beams=beams, max_new_tokens=128)
    eot = base_transcriber.tokens.eot
    assert [segment.tokens for _, segment, _ in ours] == [[t for t in row.tolist() if t < eot] for row in ids]
    assert all(text for text, _, _ in ours)
    for _, segment, _ in ours:  # each token's log-probability (include[]=logprobs) and openai/whisper's mean
        assert len(segment.token_logprobs) == len(segment.tokens) and max(segment.token_logprobs) <= 0
        end_of_text = segment.avg_logprob * (len(segment.tokens) + 1) - sum(segment.token_logprobs)
        assert -20 < end_of_text <= 1e-6
    if beams == 1:  # greedy: the same numbers as transformers' own scores of its (identical) choices
        with torch.inference_mode():
            out = base_transcriber.model.generate(input_features=base_transcriber.features(clips), language="en",
                                                  task="transcribe", max_new_tokens=128, output_scores=True,
                                                  return_dict_in_generate=True)
            theirs = base_transcriber.model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
        for (_, segment, _), row in zip(ours, theirs.tolist()):
            n = len(segment.tokens)
            assert segment.token_logprobs == pytest.approx(row[:n], abs=1e-3)
            assert segment.avg_logprob * (n + 1) - sum(segment.token_logprobs) == pytest.approx(row[n], abs=1e-3)


def test_long_form_scores_and_segments_match_faster_whisper(base_transcriber, ct2_transcriber):
    """avg_logprob (sum of token log-probabilities / (tokens + 1)) and no_speech_prob (<|nospeech|> after
    <|startoftranscript|>) per window, and the windows themselves, are faster-whisper's."""
    options = DecodeOptions(temperature=(0.0,))  # no sampling: both backends are deterministic
    audio = gregson_and_cards()
    ours = list(base_transcriber.transcribe(audio, "en", options)[0])
    theirs = list(ct2_transcriber.transcribe(audio, "en", options)[0])
    assert [s.text for s in ours] == [s.text for s in theirs]
    assert len(ours) >= 4 and len({s.avg_logprob for s in ours}) >= 2  # several windows
    for a, b in zip(ours, theirs):
        assert a.start == pytest.approx(b.start, abs=0.05) and a.end == pytest.approx(b.end, abs=0.2)
        assert a.avg_logprob == pytest.approx(b.avg_logprob, abs=0.01)
        assert a.no_speech_prob == pytest.approx(b.no_speech_prob, abs=0.005)
        assert -3 < a.avg_logprob < 0 and 0 <= a.no_speech_prob < 0.5


def test_every_path_gives_scores_and_noise_counts_as_no_speech(base_transcriber):
    clip = load_audio(SPEECH_EN / "arctic_a0009.wav")
    noise = (np.random.default_rng(0).standard_normal(16000 * 5) * 0.01).astype(np.float32)  # -40 dBFS hiss
    options = DecodeOptions(temperature=(0.0,), without_timestamps=True)
    (speech_text, speech, _), (hiss_text, hiss, _) = decode_batch(base_transcriber, [clip, noise], ["en", "en"], options)
    assert speech_text and -1 < speech.avg_logprob < 0 and speech.no_speech_prob < 0.1
    assert hiss_text == "" and hiss is None  # skipped as silence
    (short,) = base_transcriber.transcribe(clip, "en", options)[0]
    # the same window alone or in a batch of two: the same numbers, up to float rounding
    assert short.avg_logprob == pytest.approx(speech.avg_logprob, rel=1e-4)
    assert short.no_speech_prob == pytest.approx(speech.no_speech_prob, rel=1e-3)
    assert list(base_transcriber.transcribe(noise, "en", options)[0]) == []
    options = DecodeOptions(temperature=(0.0,))
    gappy = np.concatenate([np.zeros(16000 * 5, np.float32), clip, np.zeros(16000 * 30, np.float32), clip])
    for vad in (False, True):
        segments = list(base_transcriber.transcribe(gappy, "en", options, vad=vad)[0])
        assert len(segments) == 2 and all("gregson" in s.text.lower() for s in segments)
        assert all(s.avg_logprob is not None and -1 < s.avg_logprob < 0 and 0 <= s.no_speech_prob < 0.5
                   for s in segments)


def check_words(segments, duration: float) -> None:
    """Words in order, inside their segment and the audio, and spelling out the segment's text."""
    assert segments
    starts = [w.start for s in segments for w in s.words]
    assert starts == sorted(starts)
    for s in segments:
        assert s.words, s
        assert all(s.start - 0.01 <= w.start <= w.end <= s.end + 0.01 for w in s.words)
        assert all(0 <= w.start and w.end <= duration + 0.01 and 0 <= w.probability <= 1 for w in s.words)
        assert "".join(w.word for w in s.words).split() == s.text.split()


@pytest.mark.parametrize("source", ["arctic_a0007.wav", "cards/005.wav", "long"])
def test_word_timestamps_agree_with_faster_whisper(base_transcriber, ct2_transcriber, source):
    """Word times from the alignment heads (cross-attention + DTW), on the short and the long-form path,
    land where faster-whisper's do: measured median |Δstart| 0.00 s and largest 0.10 s."""
    audio = gregson_and_cards() if source == "long" else load_audio(SPEECH_EN / source)
    options = DecodeOptions(word_timestamps=True, temperature=(0.0,))
    ours = list(base_transcriber.transcribe(audio, "en", options)[0])
    theirs = list(ct2_transcriber.transcribe(audio, "en", options)[0])
    check_words(ours, len(audio) / 16000)
    ours_words = [w for s in ours for w in s.words]
    theirs_words = [w for s in theirs for w in s.words]
    assert [w.word for w in ours_words] == [w.word for w in theirs_words]
    deltas = np.array([abs(a.start - b.start) for a, b in zip(ours_words, theirs_words)])
    assert np.median(deltas) < 0.05 and deltas.max() < 0.25, deltas
    if source == "long":
        assert ours_words[-1].start > 35  # the words after the first window are timed in the whole file


def test_word_timestamps_with_vad_refer_to_the_original_audio(base_transcriber, ct2_transcriber):
    clip = load_audio(SPEECH_EN / "arctic_a0009.wav")
    options = DecodeOptions(word_timestamps=True, temperature=(0.0,))
    (alone,) = ct2_transcriber.transcribe(clip, "en", options)[0]
    audio = np.concatenate([np.zeros(16000 * 30, np.float32), clip, np.zeros(16000 * 30, np.float32), clip])
    segments = list(base_transcriber.transcribe(audio, "en", options, vad=True)[0])
    check_words(segments, len(audio) / 16000)
    assert len(segments) == 2
    for segment, offset in zip(segments, [30.0, 60.0 + len(clip) / 16000]):
        shifted = [w.start - offset for w in segment.words]
        assert len(shifted) == len(alone.words)
        assert np.median(np.abs(np.array(shifted) - [w.start for w in alone.words])) < 0.1, shifted


def test_ct2_backend_takes_a_prompt_and_a_forced_prefix_as_transformers_does(base_transcriber, ct2_transcriber):
    """What a live stream sends every decode: the text so far as the prompt, its confirmed words as the
    prefix, word timestamps. faster-whisper refused the prompt with the default token limit, and the
    prefix was dropped, so the words after it were misnumbered."""
    clip = load_audio(SPEECH_EN / "arctic_a0009.wav")
    notes = " ".join(["Inspector Gregson's notes on the case of the missing cards."] * 20)  # > 223 tokens
    # 230 new tokens: with the longest prompt faster-whisper allows (1 + 223 + 4 + prefix) that is over
    # the 448-token context, which faster-whisper refuses rather than caps
    options = DecodeOptions(temperature=(0.0,), without_timestamps=True, word_timestamps=True, max_new_tokens=230,
                            initial_prompt=notes, prefix="She walked")  # not what the clip says: forced
    for backend in (base_transcriber, ct2_transcriber):
        segments = list(backend.transcribe(clip, "en", options)[0])
        text, words = " ".join(s.text for s in segments), [w.word.strip() for s in segments for w in s.words]
        assert text.lower().startswith("she walked"), (backend, [s.text for s in segments])
        assert words[:2] == ["She", "walked"] and len(words) > 3, (backend, words)


def test_plain_text_of_long_audio_keeps_every_window_in_both_backends(base_transcriber, ct2_transcriber):
    """GREEDY asks for no timestamps (one segment per clip); past 30 s both backends decode with them, or
    faster-whisper reads each 30 s window as one segment and drops most of its words."""
    audio = gregson_and_cards()
    for backend in (base_transcriber, ct2_transcriber):
        segments, _ = backend.transcribe(audio, "en", GREEDY)
        text = " ".join(s.text for s in segments).lower()
        assert text.count("gregson") >= 3 and "spades" in text, (type(backend).__name__, text)


def test_ct2_windows_are_padded_as_whisper_was_trained(base_transcriber):
    """faster-whisper pads a short window's log-mel with 0.0; padded as trained (zero audio, frames at the log
    floor) its window is what our transformers backend encodes, but for float32 STFT noise."""
    from faster_whisper.audio import pad_or_trim
    from faster_whisper.feature_extractor import FeatureExtractor

    from whisper_lora.audio import log_mel
    from whisper_lora.decode.ct2_backend import log_floor, pad_as_trained

    clips = [load_audio(SPEECH_EN / "arctic_a0009.wav"), load_audio(SPEECH_EN / "cards" / "001.wav")]
    shipped = np.stack([pad_or_trim(FeatureExtractor()(clip)[..., :-1]) for clip in clips])
    trained = np.stack([log_mel(base_transcriber.processor, clip) for clip in clips])
    tail = shipped.shape[-1] - 100  # the last second: padding in both clips
    assert np.all(shipped[..., tail:] == 0.0) and np.all(trained[..., tail:] < -0.3)  # what differed
    fixed = np.stack([pad_as_trained(window, log_floor(window)) for window in shipped])
    for clip, window_fixed, window_trained in zip(clips, fixed, trained):
        end = len(clip) // HOP_LENGTH  # where the STFT windows reach past the audio, the two differ by design
        far = np.ones(window_fixed.shape[-1], bool)
        far[end - 1: end + EDGE_FRAMES] = False
        assert np.abs(window_fixed - window_trained)[:, far].max() < 0.01
    assert np.array_equal(pad_as_trained(shipped[:1], log_floor(shipped[:1])), fixed[:1])  # a batch of one too
    unpadded = np.ones((1, 80, 30), np.float32)
    assert np.array_equal(pad_as_trained(unpadded, -1.0), unpadded)
    quiet = shipped[0] - shipped[0].max() - 0.5  # every real frame below the padding's 0.0
    quiet[:, tail:] = 0.0
    assert log_floor(quiet) == pytest.approx(-2.5)


def test_the_ct2_backend_pads_clips_as_trained_and_long_form_as_openai_whisper(ct2_transcriber, monkeypatch):
    """Wired where the transformers backend pads each way: every window of a clip at the clip's log floor (a
    later window too), the last window of long-form input with zeros as openai-whisper's transcribe loop."""
    from faster_whisper import WhisperModel

    seen = []
    real = WhisperModel.encode
    monkeypatch.setattr(WhisperModel, "encode", lambda self, features: seen.append(np.array(features)) or
                        real(self, features))
    clip = load_audio(SPEECH_EN / "arctic_a0009.wav")
    ct2_transcriber.transcribe_batch([clip], ["en"], DecodeOptions(temperature=(0.0,)))
    floor = seen[0].max() - 2.0
    tail = slice(len(clip) // HOP_LENGTH + EDGE_FRAMES, None)
    assert seen and all(np.allclose(window[..., -100:], floor) for window in seen)
    assert np.allclose(seen[0][..., tail], floor)
    seen.clear()
    list(ct2_transcriber.transcribe(gregson_and_cards(), "en", DecodeOptions(temperature=(0.0,)))[0])
    assert len(seen) >= 2 and np.all(seen[-1][..., -100:] == 0.0)


def test_a_text_only_decode_records_what_the_alignment_pass_would_compute(base_transcriber, monkeypatch):
    """Word timestamps of a clip without timestamp tokens come from the decode's own attention: it runs the very
    sequence openai/whisper's alignment pass runs again. Rows of one batch ending at different steps each keep
    their own attention, their end-of-text row included, and give the pass's words."""
    from dataclasses import replace

    import torch

    from whisper_lora.decode.longform import clip_features
    from whisper_lora.decode.timing import find_alignment, words_from_attention

    backend, tokens = base_transcriber, base_transcriber.tokens
    clips = [load_audio(SPEECH_EN / name) for name in ("cards/001.wav", "arctic_a0009.wav", "cards/005.wav")]
    encoded = backend.encode(clip_features(backend, clips, None))
    prefix = tokens.prompt("en", "transcribe", timestamps=False)
    options = DecodeOptions(word_timestamps=True, without_timestamps=True, temperature=(0.0,))
    results = backend.decode(encoded, [prefix] * len(clips), options, False)
    assert len({len(r.tokens) for r in results}) == len(clips)  # the rows leave the batch at different steps
    for row, (clip, result) in enumerate(zip(clips, results)):
        sequence = [*prefix, *result.tokens, tokens.eot]
        with torch.inference_mode():
            caches, hidden = backend.network.start(torch.tensor([sequence]), encoded[row:row + 1], len(sequence),
                                                   None, backend.alignment_heads)
            probs = backend.network.logits(hidden[0])[len(prefix) - 1:-1, :tokens.eot].softmax(-1)
        torch.testing.assert_close(result.attention, caches.attention[0], atol=2e-5, rtol=1e-3)
        expected = probs[torch.arange(len(result.tokens)), torch.tensor(result.tokens)]
        np.testing.assert_allclose(result.text_probs, expected.numpy(), atol=1e-4)
        frames = round(len(clip) / HOP_LENGTH)
        recorded = words_from_attention(tokens, result.attention, result.text_probs, result.tokens, "en", frames,
                                        len(prefix))
        passed = find_alignment(backend.network, tokens, backend.alignment_heads, encoded[row], result.tokens, "en",
                                "transcribe", frames)
        assert [(w.word, w.start, w.end) for w in recorded] == [(w.word, w.start, w.end) for w in passed]
        assert len(recorded) > 1
    # nothing is recorded where nothing will use it: no words asked for, beam search (each beam would carry it),
    # a window after previous text (not the sequence the alignment pass runs), a window cut off before its
    # end-of-text (the pass would add one the decode never ran)
    prompted = tokens.prefix("en", "transcribe", False, tokens.prompt_ids("Inspector Gregson's notes."))
    forced = prefix + tokens.prompt_ids("He turned")
    for other, first in ((DecodeOptions(without_timestamps=True, temperature=(0.0,)), prefix),
                         (replace(options, num_beams=2), prefix), (options, prompted), (options, forced),
                         (replace(options, max_new_tokens=3), prefix)):
        assert all(r.attention is None for r in backend.decode(encoded[:1], [first], other, False))
    # and those windows get their words from the pass
    ((cut, _),) = backend.transcribe_batch(clips[1:2], ["en"], replace(options, max_new_tokens=3))
    assert len(cut[0].words) >= 2 and cut[0].words[0].start < cut[0].words[-1].start
    # the others never run it
    monkeypatch.setattr(backend, "align", lambda *args: pytest.fail("the recorded attention was not used"))
    for segments, _ in backend.transcribe_batch(clips, ["en"] * len(clips), options):
        assert [w.word for w in segments[0].words] and all(w.start <= w.end for w in segments[0].words)
