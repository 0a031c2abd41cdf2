"""The streaming policy on scripted decoder output and a scripted voice-activity schedule (no model)."""
from __future__ import annotations

import numpy as np
import pytest

from whisper_lora.decode import Segment, Word
from whisper_lora.streaming import (Confirmed, LocalAgreement, Partial, SpeechStarted, SpeechStopped, StreamOptions,
                                    StreamingTranscriber, agree)

SR = 16000


def words(*items: tuple[float, float, str]) -> list[Word]:
    return [Word(start, end, text, 0.9) for start, end, text in items]


def test_local_agreement_confirms_what_two_hypotheses_share():
    agreement = LocalAgreement()
    confirmed, partial = agreement.update(words((0, 0.4, " The"), (0.4, 0.9, " cat")))
    assert confirmed == [] and [w.word for w in partial] == [" The", " cat"]
    confirmed, partial = agreement.update(words((0, 0.4, " the"), (0.4, 0.9, " cap,"), (0.9, 1.3, " sat")))
    assert [w.word for w in confirmed] == [" the"]  # case aside, "The" = "the"; "cat" != "cap"
    assert [w.word for w in partial] == [" cap,", " sat"]
    confirmed, partial = agreement.update(words((0.4, 0.9, " cap"), (0.9, 1.3, " sat"), (1.3, 1.6, " down")))
    assert [w.word for w in confirmed] == [" cap", " sat"]  # punctuation aside
    assert agree(words((0, 1, " a")), words((0, 1, " b"))) == 0


class Schedule:
    """A voice-activity detector that hears speech exactly inside the given spans (seconds)."""

    def __init__(self, spans):
        self.spans, self.samples, self.pending = spans, 0, 0

    def __call__(self, audio):
        total = self.pending + len(audio)
        frames, self.pending = divmod(total, 512)
        first = self.samples
        self.samples += frames * 512
        times = [(first + (i + 0.5) * 512) / SR for i in range(frames)]
        return np.array([1.0 if any(a <= t < b for a, b in self.spans) else 0.0 for t in times], np.float32)


class ScriptedDecoder:
    """Hears the script's words once 0.3 s of audio follow them, and spells a word wrong while less than
    0.55 s follow it: Whisper is unsure of the words at a buffer's edge."""

    SCRIPT = words((1.2, 1.6, " Hello"), (1.6, 2.1, " there,"), (2.1, 2.6, " how"), (2.6, 3.0, " are"),
                   (3.0, 3.5, " you?"), (6.2, 6.7, " Fine,"), (6.7, 7.2, " thanks."), (7.3, 7.8, " Bye."))

    def __init__(self):
        self.streamer, self.calls, self.prompts = None, [], []

    def __call__(self, audio, options):
        start = self.streamer.buffer_start
        end = start + len(audio) / SR
        self.calls.append((round(start, 2), round(end, 2), options.prefix))
        self.prompts.append(options.initial_prompt)
        heard = [w for w in self.SCRIPT if start - 0.05 <= w.start and w.end <= end - 0.3]
        out = [Word(w.start - start, w.end - start, w.word.upper() if w.end > end - 0.55 else w.word, 0.9)
               for w in heard]
        if options.prefix:  # the forced prefix comes back as given
            assert "".join(w.word for w in out).strip().startswith(options.prefix)
        return [Segment(0, 0.0, len(audio) / SR, "".join(w.word for w in out).strip(), words=out)] if out else []


def run_stream(spans, seconds, chunk=0.25, options=StreamOptions(min_chunk=0.5, policy="local-agreement")):
    decoder = ScriptedDecoder()
    streamer = StreamingTranscriber(decoder, options=options, detector=Schedule(spans))
    decoder.streamer = streamer
    events = []
    audio = (np.random.default_rng(0).standard_normal(int(seconds * SR)) * 0.05).astype(np.float32)
    for i in range(0, len(audio), int(chunk * SR)):
        events += streamer.feed(audio[i:i + int(chunk * SR)])
    events += streamer.commit()
    return events, decoder, streamer


class ScriptedStepper:
    """AlignAtt as the streamer sees it (the rule itself is tested in test_alignatt): a decode hears the
    script's words after the forced prefix, stops at the first one that ends within 0.5 s of the buffer's
    end (the frontier) and holds the last word before it back, unless the audio ended."""

    def __init__(self):
        self.streamer, self.calls = None, []

    def __call__(self, audio, options, final, start):
        offset = self.streamer.buffer_start
        end = offset + len(audio) / SR
        self.calls.append((round(offset, 2), round(end, 2), options.prefix, round(start, 2), final))
        kept = len(self.streamer.kept)
        heard = [w for w in ScriptedDecoder.SCRIPT if offset - 0.05 <= w.start and w.start < end][kept:]
        safe = heard if final else [w for w in heard if w.end <= end - 0.5]
        committed = safe if final else safe[:-1]
        shift = [Word(w.start - offset, w.end - offset, w.word, 0.9) for w in heard]
        return shift[:len(committed)], shift[len(committed):], "end" if final else "frontier"


def test_alignatt_confirms_each_word_after_one_decode_and_holds_the_last_back():
    stepper = ScriptedStepper()
    streamer = StreamingTranscriber(lambda *a: pytest.fail("alignatt never calls decode"),
                                    options=StreamOptions(min_chunk=0.5, policy="alignatt"),
                                    detector=Schedule([(1.0, 3.6), (6.0, 7.9)]), step=stepper)
    stepper.streamer = streamer
    audio = (np.random.default_rng(0).standard_normal(10 * SR) * 0.05).astype(np.float32)
    events = [e for i in range(0, len(audio), 4000) for e in streamer.feed(audio[i:i + 4000])] + streamer.commit()
    stops = [e for e in events if isinstance(e, SpeechStopped)]
    assert [s.text for s in stops] == ["Hello there, how are you?", "Fine, thanks. Bye."]
    for stop in stops:
        deltas = [e.delta for e in events if isinstance(e, Confirmed) and e.utterance == stop.utterance]
        assert "".join(deltas) == stop.text
    confirmed = [w for e in events if isinstance(e, Confirmed) for w in e.segment.words]
    assert [(w.word, w.start, w.end) for w in confirmed] == [(w.word, w.start, w.end) for w in ScriptedDecoder.SCRIPT]
    # a word is confirmed by the first decode in which a later word is safe: no second decode to agree
    hello = next(i for i, call in enumerate(stepper.calls) if call[1] - 0.5 >= 2.1)  # "there," (ends 2.1) safe
    assert stepper.calls[hello + 1][2] == "Hello"  # so the next decode forces "Hello" as confirmed
    assert any(isinstance(e, Partial) and e.text for e in events)  # the held word shows as partial text
    for offset, _, prefix, start, final in stepper.calls:  # each decode forced what was confirmed before it
        if prefix:
            assert start > 0 and prefix.split()[0] in ("Hello", "Fine,")


def test_utterances_confirm_words_once_and_their_deltas_add_up_to_the_transcript():
    events, decoder, _ = run_stream([(1.0, 3.6), (6.0, 7.9)], 10.0)
    kinds = [type(e).__name__ for e in events if not isinstance(e, Partial)]
    assert kinds[0] == "SpeechStarted" and kinds.count("SpeechStarted") == kinds.count("SpeechStopped") == 2
    stops = [e for e in events if isinstance(e, SpeechStopped)]
    assert [s.text for s in stops] == ["Hello there, how are you?", "Fine, thanks. Bye."]
    for stop in stops:  # the deltas of an utterance, in order, make its transcript
        deltas = [e.delta for e in events if isinstance(e, Confirmed) and e.utterance == stop.utterance]
        assert "".join(deltas) == stop.text
    confirmed = [w for e in events if isinstance(e, Confirmed) for w in e.segment.words]
    assert [w.word.strip() for w in confirmed] == [w.word.strip() for w in ScriptedDecoder.SCRIPT]  # none misheard
    assert all(w.start == s.start and w.end == s.end for w, s in zip(confirmed, ScriptedDecoder.SCRIPT))
    # the misheard newest word shows up as partial text before it is confirmed right
    assert any(isinstance(e, Partial) and "HOW" in e.text for e in events)
    started = [e for e in events if isinstance(e, SpeechStarted)]
    assert [s.at for s in started] == [pytest.approx(1.0, abs=0.04), pytest.approx(6.0, abs=0.04)]
    assert [s.at for s in stops] == [pytest.approx(4.1, abs=0.05), pytest.approx(8.4, abs=0.05)]


def test_silence_is_never_decoded():
    events, decoder, streamer = run_stream([], 60.0, chunk=0.5)
    assert events == [] and decoder.calls == []
    events, decoder, _ = run_stream([(1.0, 3.6)], 30.0)
    assert all(start >= 0.65 and end <= 4.2 for start, end, _ in decoder.calls)  # only the utterance's audio


def test_confirmed_words_are_forced_and_the_buffer_is_cut_at_a_sentence_end():
    options = StreamOptions(min_chunk=0.5, trim_after=2.0, policy="local-agreement")
    events, decoder, streamer = run_stream([(1.0, 7.9)], 9.0, options=options)  # one long utterance
    prefixes = [p for _, _, p in decoder.calls if p]
    assert prefixes and prefixes[0].startswith("Hello")  # later decodes only search past the confirmed words
    starts = [start for start, _, _ in decoder.calls]
    assert max(starts) >= 3.4  # cut after "you?" once the buffer was long: the window moved on
    (stop,) = [e for e in events if isinstance(e, SpeechStopped)]
    assert stop.text == "Hello there, how are you? Fine, thanks. Bye."
    assert any(p and p.endswith("you?") for p in decoder.prompts)  # what was cut off became the prompt


def test_a_decoder_slower_than_min_chunk_decodes_less_often_instead_of_falling_behind(monkeypatch):
    """Each decode costs 0.4 s here (a fake clock) against a min_chunk of 0.1 s: back to back, decoding
    would take 4x the stream's time; with max_busy 0.8 a decode waits for 0.5 s of new speech."""
    import whisper_lora.streaming as streaming

    clock = [0.0]
    monkeypatch.setattr(streaming.time, "perf_counter", lambda: clock[0])

    class SlowDecoder(ScriptedDecoder):
        def __call__(self, audio, options):
            clock[0] += 0.4
            return super().__call__(audio, options)

    decoder = SlowDecoder()
    streamer = StreamingTranscriber(decoder, options=StreamOptions(min_chunk=0.1, policy="local-agreement"),
                                    detector=Schedule([(1.0, 3.6)]))
    decoder.streamer = streamer
    audio = (np.random.default_rng(0).standard_normal(5 * SR) * 0.05).astype(np.float32)
    events = []
    for i in range(0, len(audio), 800):  # 50 ms pieces
        events += streamer.feed(audio[i:i + 800])
    ends = [end for _, end, _ in decoder.calls]
    gaps = np.diff(ends[:-1])  # the last decode closes the utterance whenever it ends
    assert len(gaps) and gaps.min() >= 0.5 - 1e-6, ends
    assert streamer.decode_seconds <= 0.8 * (3.6 - 1.0) + 0.4 + 0.4  # busy <= 80%, plus the first and last
    (stop,) = [e for e in events if isinstance(e, SpeechStopped)]
    assert stop.text == "Hello there, how are you?"  # less often, still every word


def test_a_live_decode_may_write_only_as_many_tokens_as_its_audio_could_hold():
    """Whisper loops on some partial buffers; a loop of hundreds of tokens and its fallbacks took ~10 s where
    a decode takes ~2 and put the stream behind. The limit grows with the buffer, far above speech."""
    limits = []

    class Recording(ScriptedDecoder):
        def __call__(self, audio, options):
            limits.append((len(audio) / SR, options.max_new_tokens))
            return super().__call__(audio, options)

    decoder = Recording()
    streamer = StreamingTranscriber(decoder, options=StreamOptions(min_chunk=0.5, policy="local-agreement"),
                                    detector=Schedule([(1.0, 3.6)]))
    decoder.streamer = streamer
    audio = (np.random.default_rng(0).standard_normal(5 * SR) * 0.05).astype(np.float32)
    events = [e for i in range(0, len(audio), 4000) for e in streamer.feed(audio[i:i + 4000])]
    assert len(limits) >= 3
    for seconds, limit in limits[:-1]:
        assert 16 + 12 * seconds - 1 <= limit <= 16 + 12 * seconds, (seconds, limit)  # 3.4 s of buffer: 56 tokens
    seconds, limit = limits[-1]  # the final decode, whose words are all confirmed, may write twice as many
    assert 16 + 24 * seconds - 1 <= limit <= 16 + 24 * seconds, (seconds, limit)
    assert limits[-2][1] > limits[0][1]
    (stop,) = [e for e in events if isinstance(e, SpeechStopped)]
    assert stop.text == "Hello there, how are you?"
