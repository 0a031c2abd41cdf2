"""Streaming transcription: audio in pieces -> partial text and confirmed segments while the speech goes on.

The frame is whisper_streaming's (Macháček et al., "Turning Whisper into Real-Time Transcription
System", with its VAD-gated mode), on any model or adapter the service serves, with two policies for
when a word is confirmed:

* `local-agreement` (LocalAgreement-2, below): a word is confirmed when two consecutive decodes agree on
  it, so it waits for two decodes.
* `alignatt` (decode/alignatt.py, SimulStreaming's policy): one decode per chunk, stopped where the
  decoder's cross-attention reaches the end of the audio heard so far; what came before is confirmed at
  once, the last word is held back until the next chunk (or the end of the utterance).

The rest is shared:

* Silero VAD runs on every piece. Silence is never decoded (so no "Thank you." out of nothing); an
  utterance starts with speech (plus `prefix_padding` of what came before) and ends after `silence` s
  without it, when its last words are confirmed by a final decode.
* While an utterance goes on, its audio buffer is decoded again whenever `min_chunk` s of it are new,
  or more on a slow machine: decoding takes at most `max_busy` of the stream's time, so it keeps up.
  LocalAgreement-2: words on which two consecutive decodes agree are confirmed and never change; the
  rest is partial text.
* Confirmed words inside the buffer are forced as the decoder's prefix, so each decode only searches
  the unconfirmed tail; confirmed text before the buffer is the prompt. The buffer is cut at the end
  of a confirmed sentence once it holds `trim_after` s, so it stays well under Whisper's 30 s window
  however long the speech runs, and memory and time per decode stay flat for hours.
"""
from __future__ import annotations

import string
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from .audio_ctx import STREAM_DEFAULT
from .constants import MAX_NEW_TOKENS, SAMPLE_RATE
from .decode import DecodeOptions, Segment, Word
from .vad import FRAME_SAMPLES as FRAME

SENTENCE_ENDS = tuple(".?!。？！")
PUNCTUATION = string.punctuation + "。，、？！：；「」『』“”"


@dataclass(frozen=True)
class StreamOptions:
    threshold: float = 0.5  # Silero speech probability that counts as speech (OpenAI's server_vad default)
    silence: float = 0.5  # s without speech that end an utterance (OpenAI's silence_duration_ms 500)
    prefix_padding: float = 0.3  # s of audio before the detected onset kept in the utterance (prefix_padding_ms)
    min_chunk: float = 1.0  # s of new speech before the buffer is decoded again
    # Share of the stream's time spent decoding at most: a decode waits for (last decode's time / max_busy)
    # s of new speech, so a machine too slow for `min_chunk` decodes less often (a little later) instead
    # of decoding back to back and falling further behind the longer the stream runs.
    max_busy: float = 0.8
    trim_after: float = 12.0  # s of buffer after which it is cut at a confirmed sentence end
    max_buffer: float = 25.0  # s: past this, cut at the last confirmed word; Whisper's window is 30 s
    prompt_chars: int = 200  # confirmed text before the buffer given as the prompt
    # Whether an utterance's text primes the next one. Off: each utterance is primed by the session's prompt
    # (and, within a long utterance, by what was cut from its buffer) only; on, a run of short utterances
    # ("eight of spades", "five five") led Whisper to open the next sentence with "8-5." (measured in
    # bench/realtime_bench.py), as offline decoding without conditioning on previous text does not.
    carry_context: bool = False
    temperature: tuple[float, ...] = (0.0, 0.4, 0.8)  # a short ladder: a live decode cannot wait for six
    # Tokens a decode may write per s of buffer (plus `tokens_floor`): far above speech (~3-8 tokens/s in
    # English or Mandarin), far below a loop. Whisper loops on some partial buffers; uncapped, such a
    # decode and its fallbacks wrote hundreds of tokens and took ~10 s where a decode takes ~2. An
    # utterance's final decode, whose words are all confirmed, may write twice as many: languages the
    # tokenizer splits finely (Hindi, Tamil: ~2.7x English) must not lose their last words to it.
    tokens_per_second: float = 12.0
    tokens_floor: int = 16
    audio_ctx: str | float | None = STREAM_DEFAULT  # encoder context of each decode (audio_ctx.py)
    policy: str = "alignatt"  # or "local-agreement": when a word is confirmed (see the module's docstring)


# ---- events ------------------------------------------------------------------------------------------

@dataclass
class SpeechStarted:
    utterance: int
    at: float  # s in the stream


@dataclass
class Partial:
    utterance: int
    text: str  # what follows the confirmed text for now; may change


@dataclass
class Confirmed:
    utterance: int
    segment: Segment  # times in the stream; never changes
    delta: str  # the text to append to the utterance's confirmed text (leading space included)


@dataclass
class SpeechStopped:
    utterance: int
    at: float
    text: str  # the utterance's whole transcript: its deltas, joined
    segments: list[Segment] = field(default_factory=list)


Event = SpeechStarted | Partial | Confirmed | SpeechStopped


# ---- LocalAgreement ----------------------------------------------------------------------------------

def _key(word: Word) -> str:
    return word.word.strip().lower().strip(PUNCTUATION)


def agree(previous: list[Word], current: list[Word]) -> int:
    """How many leading words two consecutive hypotheses share (case and punctuation aside)."""
    count = 0
    for a, b in zip(previous, current):
        if _key(a) != _key(b):
            break
        count += 1
    return count


class LocalAgreement:
    """LocalAgreement-2 over the unconfirmed tail: confirm what the last two hypotheses agree on."""

    def __init__(self):
        self.previous: list[Word] = []

    def update(self, hypothesis: list[Word]) -> tuple[list[Word], list[Word]]:
        """(newly confirmed words, still partial words) for the latest hypothesis of the unconfirmed tail."""
        count = agree(self.previous, hypothesis)
        confirmed, self.previous = hypothesis[:count], hypothesis[count:]
        return confirmed, self.previous

    def reset(self) -> None:
        self.previous = []


# ---- the stream --------------------------------------------------------------------------------------

Decoder = Callable[[np.ndarray, DecodeOptions], list[Segment]]
# AlignAtt: (buffer, options, final, where the committed text ends in s) -> (committed words, held words,
# why the decode stopped), times in the buffer; the service's `stream_step` for a model or adapter
Stepper = Callable[[np.ndarray, DecodeOptions, bool, float], tuple[list[Word], list[Word], str]]
POLICIES = ("local-agreement", "alignatt")


class StreamingTranscriber:
    """`feed(pcm)` -> events. `decode(audio, options)` transcribes one buffer (at most 30 s) and returns its
    segments with words, times in the buffer: the service's `transcribe` for a model or adapter."""

    def __init__(self, decode: Decoder, language: str | None = None, prompt: str | None = None,
                 options: StreamOptions = StreamOptions(), detector=None, step: Stepper | None = None):
        from .vad import SpeechDetector

        if options.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {options.policy!r}")
        if options.policy == "alignatt" and step is None:
            raise ValueError("the alignatt policy needs a `step` function (the service's stream_step)")
        self.decode_fn, self.step_fn, self.language, self.options = decode, step, language, options
        self.detector = detector or SpeechDetector()
        self.prompt = (prompt or "").strip()  # the session's
        self.context = self.prompt  # confirmed text before the buffer (and the session's prompt)
        self.samples = 0  # fed so far: stream time = samples / SAMPLE_RATE
        self.utterance = 0
        self.in_speech = False
        self.silence_run = 0.0
        self.tail = np.zeros(0, np.float32)  # the last `prefix_padding` s heard outside speech
        self._reset_buffer()
        self.decode_seconds = 0.0  # compute spent decoding, for real-time factors
        self.last_decode_seconds = 0.0
        self.decodes = 0

    def _reset_buffer(self) -> None:
        self.buffer = np.zeros(0, np.float32)
        self.buffer_start = 0.0  # stream time of buffer[0]
        self.decoded_until = 0.0  # buffer seconds covered by the last decode
        self.kept: list[Word] = []  # confirmed words inside the buffer (stream times)
        self.utterance_words: list[Word] = []  # every confirmed word of the utterance
        self.utterance_segments: list[Segment] = []
        self.agreement = LocalAgreement()
        self.tentative: list[Word] = []  # decoded, not confirmed: the partial text

    @property
    def now(self) -> float:
        return self.samples / SAMPLE_RATE

    # ---- input ----------------------------------------------------------------------------------------

    def feed(self, pcm: np.ndarray) -> list[Event]:
        """16 kHz mono float32 audio, any length; returns what it caused: `hear` then `update`."""
        return self.hear(pcm) + self.update()

    def update(self) -> list[Event]:
        """Decode the utterance under way once enough of it is new (`min_chunk`, or more when decodes are
        slow: `max_busy`); at most one decode."""
        wait = max(self.options.min_chunk, self.last_decode_seconds / self.options.max_busy)
        if self.in_speech and len(self.buffer) / SAMPLE_RATE - self.decoded_until >= wait:
            return self._update()
        return []

    def hear(self, pcm: np.ndarray) -> list[Event]:
        """Voice activity and buffering only (plus the final decode of an utterance that ends here), so a
        front end can announce speech before the next decode runs."""
        pcm = np.asarray(pcm, np.float32).reshape(-1)
        events: list[Event] = []
        probabilities = self.detector(pcm)
        first = self.samples  # stream sample of pcm[0]
        self.samples += len(pcm)
        # the frames just completed end where the detector's leftover begins
        frames_begin = self.samples - self.detector.pending - len(probabilities) * FRAME
        consumed = 0  # pcm before this index is in the buffer or the tail already
        for i, probability in enumerate(probabilities):
            frame_start = frames_begin + i * FRAME
            speech = probability >= self.options.threshold
            if not self.in_speech:
                if speech:
                    onset = max(0, frame_start - first)
                    events.append(self._start(pcm[consumed:onset], first + onset, frame_start))
                    consumed = onset
            else:
                self.silence_run = 0.0 if speech else self.silence_run + FRAME / SAMPLE_RATE
                if self.silence_run >= self.options.silence:
                    end = max(consumed, frame_start + FRAME - first)
                    self.buffer = np.concatenate([self.buffer, pcm[consumed:end]])
                    consumed = end
                    events += self._finish((frame_start + FRAME) / SAMPLE_RATE)
        if self.in_speech:
            self.buffer = np.concatenate([self.buffer, pcm[consumed:]])
        else:
            keep = int(self.options.prefix_padding * SAMPLE_RATE)
            self.tail = np.concatenate([self.tail, pcm[consumed:]])[-keep:] if keep else self.tail[:0]
        return events

    def commit(self) -> list[Event]:
        """End the current utterance now (the client committed, or the stream ended)."""
        if not self.in_speech:
            return []
        return self._finish(self.now)

    def clear(self) -> None:
        """Drop the audio of the utterance under way, unconfirmed."""
        self.in_speech, self.silence_run = False, 0.0
        self._reset_buffer()

    # ---- utterances -----------------------------------------------------------------------------------

    def _start(self, before: np.ndarray, padding_end: int, onset: int) -> SpeechStarted:
        """Speech from stream sample `onset`: the buffer opens with up to `prefix_padding` s of what came
        before (`before`, the audio heard since the tail, ends at sample `padding_end`)."""
        self.in_speech, self.silence_run = True, 0.0
        self.utterance += 1
        self._reset_buffer()
        keep = int(self.options.prefix_padding * SAMPLE_RATE)
        self.buffer = np.concatenate([self.tail, before])[-keep:] if keep else np.zeros(0, np.float32)
        self.buffer_start = (padding_end - len(self.buffer)) / SAMPLE_RATE
        self.tail = np.zeros(0, np.float32)
        return SpeechStarted(self.utterance, round(onset / SAMPLE_RATE, 3))

    def _finish(self, at: float) -> list[Event]:
        """The utterance ended: one last decode, whose words are all confirmed."""
        events = self._update(final=True)
        text = "".join(w.word for w in self.utterance_words).strip()
        events.append(SpeechStopped(self.utterance, round(at, 3), text, list(self.utterance_segments)))
        self.in_speech, self.silence_run = False, 0.0
        if text and self.options.carry_context:
            self.context = (self.context + " " + text).strip()[-self.options.prompt_chars:]
        elif not self.options.carry_context:
            self.context = self.prompt
        self._reset_buffer()
        return events

    def _options(self, final: bool) -> DecodeOptions:
        forced = "".join(w.word for w in self.kept).strip()
        rate = self.options.tokens_per_second * (2 if final else 1)
        limit = int(self.options.tokens_floor + rate * len(self.buffer) / SAMPLE_RATE)
        return DecodeOptions(temperature=self.options.temperature, without_timestamps=True, word_timestamps=True,
                             max_new_tokens=min(MAX_NEW_TOKENS, limit),
                             initial_prompt=self.context[-self.options.prompt_chars:] or None,
                             prefix=forced or None, audio_ctx=self.options.audio_ctx)

    def _timed(self, run):
        started = time.perf_counter()
        result = run()
        self.last_decode_seconds = time.perf_counter() - started
        self.decode_seconds += self.last_decode_seconds
        self.decodes += 1
        self.decoded_until = len(self.buffer) / SAMPLE_RATE
        return result

    def _in_stream(self, words: list[Word]) -> list[Word]:
        offset = self.buffer_start
        return [Word(round(w.start + offset, 3), round(w.end + offset, 3), w.word, w.probability) for w in words]

    def _decode(self, final: bool = False) -> list[Word]:
        """The buffer's words (stream times) after the confirmed ones, from one decode."""
        segments = self._timed(lambda: self.decode_fn(self.buffer, self._options(final)))
        shifted = self._in_stream([w for s in segments for w in (s.words or [])])
        return shifted[len(self.kept):] if len(shifted) >= len(self.kept) else []

    def _step(self, final: bool) -> tuple[list[Word], list[Word]]:
        """AlignAtt: one decode; (words confirmed now, words held back), stream times."""
        options = replace(self._options(final), temperature=(0.0,))  # one pass: no fallback ladder
        start = self.kept[-1].end - self.buffer_start if self.kept else 0.0
        committed, held, _ = self._timed(lambda: self.step_fn(self.buffer, options, final, start))
        return self._in_stream(committed), self._in_stream(held)

    def _update(self, final: bool = False) -> list[Event]:
        if len(self.buffer) == 0:
            return []
        if self.options.policy == "alignatt":
            confirmed, partial = self._step(final)
        else:
            hypothesis = self._decode(final)
            confirmed, partial = (hypothesis, []) if final else self.agreement.update(hypothesis)
        if final:
            self.agreement.reset()
            partial = []
        self.tentative = partial
        events: list[Event] = []
        if confirmed:
            events.append(self._confirm(confirmed))
        if not final:
            events.append(Partial(self.utterance, "".join(w.word for w in partial).strip()))
            events += self._trim()
        return events

    def _confirm(self, words: list[Word]) -> Confirmed:
        delta = "".join(w.word for w in words)
        if not self.utterance_words:
            delta = delta.lstrip()
        self.kept += words
        self.utterance_words += words
        segment = Segment(len(self.utterance_segments), words[0].start, words[-1].end, delta.strip(), words=words)
        self.utterance_segments.append(segment)
        return Confirmed(self.utterance, segment, delta)

    def _trim(self) -> list[Event]:
        """Cut the buffer after confirmed words, so it stays short: at a sentence end once it is long, at any
        confirmed word once it nears Whisper's window; past that, what no decode could agree on is confirmed
        as last heard (the window must move on)."""
        seconds = len(self.buffer) / SAMPLE_RATE
        if seconds < self.options.trim_after:
            return []
        events: list[Event] = []
        cut = next((i for i in range(len(self.kept) - 1, -1, -1) if self.kept[i].word.strip().endswith(SENTENCE_ENDS)),
                   None)
        if cut is None and seconds >= self.options.max_buffer:
            if self.tentative:
                events += [self._confirm(self.tentative), Partial(self.utterance, "")]
                self.agreement.reset()
                self.tentative = []
            if not self.kept:  # nothing recognisable in 25 s of "speech" (music, noise): keep the last seconds
                self._drop(len(self.buffer) - int(self.options.trim_after * SAMPLE_RATE))
                return events
            cut = len(self.kept) - 1
        if cut is None:
            return events
        spoken = "".join(w.word for w in self.kept[:cut + 1]).strip()
        self.context = (self.context + " " + spoken).strip()[-self.options.prompt_chars:]
        self._drop(int(round((self.kept[cut].end - self.buffer_start) * SAMPLE_RATE)))
        self.kept = self.kept[cut + 1:]
        return events

    def _drop(self, samples: int) -> None:
        samples = max(0, min(samples, len(self.buffer)))
        self.buffer = self.buffer[samples:]
        self.buffer_start += samples / SAMPLE_RATE
        self.decoded_until = max(0.0, self.decoded_until - samples / SAMPLE_RATE)
