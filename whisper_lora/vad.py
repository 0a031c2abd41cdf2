"""Voice-activity detection as a pure function: audio in, speech regions out.

Uses the Silero VAD model that ships inside the faster-whisper package (ONNX, run offline through
onnxruntime), so no model is downloaded. Regions are packed into windows of at most 30 s that keep
the pauses between them up to KEPT_PAUSE_SECONDS (longer silences shortened to that), which the
decoder then transcribes in batches; `SpeechWindow` maps times inside a window back to the original
audio.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .constants import CHUNK_SECONDS, SAMPLE_RATE
from .errors import UserError

MIN_SILENCE_MS = 500  # a pause this long separates two regions
SPEECH_PAD_MS = 200  # kept on each side of a region so word edges are not clipped
KEPT_PAUSE_SECONDS = 2.0  # a pause up to this long stays in a decoder window as it was; a longer one shrinks to it


@dataclass(frozen=True)
class SpeechRegion:
    start: float  # seconds in the original audio
    end: float

    @property
    def duration(self) -> float:
        return self.end - self.start


def speech_regions(audio: np.ndarray, threshold: float = 0.5, min_silence_ms: int = MIN_SILENCE_MS,
                   speech_pad_ms: int = SPEECH_PAD_MS, min_speech_ms: int = 0,
                   max_seconds: float = CHUNK_SECONDS - 1) -> list[SpeechRegion]:
    """Speech regions of 16 kHz mono audio by Silero VAD (faster-whisper's ONNX build), each at most `max_seconds`
    long; the defaults cut regions for Whisper's 30 s windows."""
    try:
        from faster_whisper.vad import VadOptions, get_speech_timestamps
    except ImportError:
        raise UserError("--vad needs the Silero model shipped with faster-whisper: pip install 'whisper-lora[ct2]'") from None
    options = VadOptions(threshold=threshold, min_silence_duration_ms=min_silence_ms, speech_pad_ms=speech_pad_ms,
                         min_speech_duration_ms=min_speech_ms, max_speech_duration_s=max_seconds)
    stamps = get_speech_timestamps(audio, options, sampling_rate=SAMPLE_RATE)
    return [SpeechRegion(s["start"] / SAMPLE_RATE, s["end"] / SAMPLE_RATE) for s in stamps]


def pack_regions(regions: list[SpeechRegion], max_seconds: float = CHUNK_SECONDS) -> list[list[SpeechRegion]]:
    """Group consecutive regions into windows holding at most `max_seconds` of audio in all."""
    windows: list[list[SpeechRegion]] = []
    length = 0.0
    for region in regions:
        if windows and length + region.duration <= max_seconds:
            windows[-1].append(region)
            length += region.duration
        else:
            windows.append([region])
            length = region.duration
    return windows


def speech_windows(regions: list[SpeechRegion], duration: float, max_seconds: float = CHUNK_SECONDS,
                   kept_pause: float = KEPT_PAUSE_SECONDS) -> list[SpeechWindow]:
    """Decoder windows of at most `max_seconds` built from speech regions, pauses kept up to `kept_pause`.

    Each region is widened into the pauses around it by up to half of `kept_pause`, so a short pause
    stays whole and a long one (silence, music) shrinks to `kept_pause`; regions that then touch are
    merged. Whisper was trained on speech with its pauses: windows of regions glued back to back make
    it end the transcript early and drop what follows (the word loss batched VAD decoding used to have).
    """
    spans: list[SpeechRegion] = []
    for i, region in enumerate(regions):
        before = region.start - (regions[i - 1].end if i else 0.0)
        after = (regions[i + 1].start if i + 1 < len(regions) else duration) - region.end
        widen = [min(max(before, 0.0), kept_pause) / 2, min(max(after, 0.0), kept_pause) / 2]
        room = max(0.0, max_seconds - region.duration)
        if sum(widen) > room:
            widen = [w * room / sum(widen) for w in widen]
        start, end = region.start - widen[0], region.end + widen[1]
        if spans and start <= spans[-1].end + 1e-6 and end - spans[-1].start <= max_seconds:
            spans[-1] = SpeechRegion(spans[-1].start, end)
        else:
            spans.append(SpeechRegion(max(start, spans[-1].end if spans else 0.0), end))
    windows = []
    for packed in pack_regions(spans, max_seconds):
        inside = tuple(r for r in regions if packed[0].start <= r.start and r.end <= packed[-1].end)
        windows.append(SpeechWindow(tuple(packed), inside))
    return windows


@dataclass(frozen=True)
class SpeechWindow:
    """The audio one decoder window sees: `spans` of the original audio played back to back, holding
    the VAD `speech` regions. Window times map back to original times through the spans; a time that
    lands in a pause is moved to the nearest speech (a start forward, an end back), so a segment never
    starts in a pause, and never across a cut one."""
    spans: tuple[SpeechRegion, ...]
    speech: tuple[SpeechRegion, ...] = ()

    @property
    def duration(self) -> float:
        return sum(r.duration for r in self.spans)

    def samples(self, audio: np.ndarray) -> np.ndarray:
        return np.concatenate([audio[round(r.start * SAMPLE_RATE): round(r.end * SAMPLE_RATE)] for r in self.spans])

    def _through_spans(self, t: float, is_end: bool) -> float:
        # At the seam between two spans an end belongs to the span before it, a start to the one after.
        position = 0.0
        for i, span in enumerate(self.spans):
            inside = t < position + span.duration or (is_end and t <= position + span.duration)
            if inside or i == len(self.spans) - 1:
                return min(span.end, span.start + max(0.0, t - position))
            position += span.duration
        return self.spans[-1].end

    def to_original(self, t: float, is_end: bool = False) -> float:
        """Original time of window time `t`."""
        original = self._through_spans(t, is_end)
        if not self.speech or any(r.start <= original <= r.end for r in self.speech):
            return original
        if is_end:
            return max((r.end for r in self.speech if r.end <= original), default=original)
        return min((r.start for r in self.speech if r.start >= original), default=original)

    def to_window(self, original: float) -> float:
        """Window time of an original time inside one of the spans (the start of the next span if none)."""
        position = 0.0
        for span in self.spans:
            if original < span.end:
                return position + max(0.0, original - span.start)
            position += span.duration
        return position

    def after(self, t: float) -> SpeechWindow | None:
        """The part of the window from window time `t` on (None if nothing is left)."""
        rest, position = [], 0.0
        for span in self.spans:
            if position + span.duration > t:
                rest.append(SpeechRegion(span.start + max(0.0, t - position), span.end))
            position += span.duration
        if not rest:
            return None
        return SpeechWindow(tuple(rest), tuple(r for r in self.speech if r.end > rest[0].start))

    def unheard(self, t: float) -> tuple[int, float]:
        """What VAD heard after window time `t`: how many speech regions start there or later, and how
        many seconds are left of the region under way at `t`."""
        original = self._through_spans(t, False)
        later = sum(self.to_window(r.start) >= t for r in self.speech)
        left = max((r.end - original for r in self.speech if r.start < original < r.end), default=0.0)
        return later, left


FRAME_SAMPLES = 512  # samples per Silero frame (32 ms at 16 kHz)
CONTEXT_SAMPLES = 64  # samples of the previous frame Silero sees before each frame


class SpeechDetector:
    """Silero's speech probability for audio that arrives in pieces, one per 32 ms frame.

    The model's recurrent state and the last frame's tail are carried from one piece to the next, so
    feeding a stream in pieces gives the probabilities feeding it whole would (a test checks it).
    """

    def __init__(self):
        try:
            from faster_whisper.vad import get_vad_model
        except ImportError:
            raise UserError("streaming needs the Silero model shipped with faster-whisper: "
                            "pip install 'whisper-lora[ct2]'") from None
        self._session = get_vad_model().session
        self._state = (np.zeros((1, 1, 128), np.float32), np.zeros((1, 1, 128), np.float32))
        self._context = np.zeros(CONTEXT_SAMPLES, np.float32)
        self._pending = np.zeros(0, np.float32)

    @property
    def pending(self) -> int:
        """Samples received that do not make a whole frame yet."""
        return len(self._pending)

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        """Probabilities of the whole frames completed by `audio` (leftover samples wait for the next call)."""
        audio = np.concatenate([self._pending, audio.astype(np.float32, copy=False)])
        count = len(audio) // FRAME_SAMPLES
        self._pending = audio[count * FRAME_SAMPLES:]
        if count == 0:
            return np.zeros(0, np.float32)
        frames = audio[:count * FRAME_SAMPLES].reshape(count, FRAME_SAMPLES)
        contexts = np.concatenate([self._context[None], frames[:-1, -CONTEXT_SAMPLES:]])
        self._context = frames[-1, -CONTEXT_SAMPLES:].copy()
        output, h, c = self._session.run(None, {"input": np.concatenate([contexts, frames], 1),
                                                "h": self._state[0], "c": self._state[1]})
        self._state = (h, c)
        return np.asarray(output, np.float32).reshape(-1)
