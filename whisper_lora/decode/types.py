"""What decoding returns and takes: typed results (faster-whisper's shapes) and the Backend protocol."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np

from ..constants import MAX_NEW_TOKENS, NO_SPACE_LANGUAGES


@dataclass
class Word:
    start: float  # seconds from the start of the input audio
    end: float
    word: str  # with its leading space, as the tokenizer spells it
    probability: float
    speaker: str | None = None  # set by diarize.assign_speakers when asked for


@dataclass
class Sentiment:
    label: str  # positive, negative or neutral
    score: float  # the analyser's confidence in the label, 0-1


@dataclass
class Segment:
    id: int
    start: float  # seconds from the start of the input audio
    end: float
    text: str
    tokens: list[int] = field(default_factory=list)
    avg_logprob: float | None = None  # of the window the segment was decoded in, as faster-whisper
    no_speech_prob: float | None = None
    words: list[Word] | None = None
    seek: int = 0  # log-mel frame (10 ms) where the segment's window starts, as openai/whisper
    temperature: float | None = None  # of the attempt that was kept
    compression_ratio: float | None = None  # gzip ratio of the window's text
    sentiment: Sentiment | None = None  # set by sentiment.annotate when asked for
    token_logprobs: list[float] | None = None  # of each of `tokens` (our decoding loop; None from CTranslate2)
    speaker: str | None = None  # set by diarize.assign_speakers when asked for


@dataclass
class TranscriptionInfo:
    language: str | None
    language_probability: float | None
    duration: float  # seconds of input audio
    sentiment: Sentiment | None = None  # of the whole transcript, when asked for
    sentiment_note: str | None = None  # why there is no sentiment (a language without an analyser)


def join_text(segments: list[Segment], language: str | None) -> str:
    """The whole transcript: segments joined with spaces, or without for languages written without them."""
    return ("" if language in NO_SPACE_LANGUAGES else " ").join(s.text for s in segments).strip()


@dataclass(frozen=True)
class DecodeOptions:
    """Decoding settings, named and defaulted as in openai/whisper and faster-whisper."""
    task: str = "transcribe"
    num_beams: int = 1
    temperature: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # fallback ladder
    compression_ratio_threshold: float | None = 2.4  # above: repetition loop, retry hotter
    log_prob_threshold: float | None = -1.0  # below: low confidence, retry hotter
    no_speech_threshold: float | None = 0.6  # above (and low log-prob): silence, no text
    initial_prompt: str | None = None
    prefix: str | None = None  # text the window's transcript is forced to begin with (without timestamps only)
    condition_on_previous_text: bool = False  # off: a loop in one window cannot leak into the next
    word_timestamps: bool = False
    without_timestamps: bool = False  # one segment per clip of up to 30 s (cheaper); longer audio always has them
    max_new_tokens: int = MAX_NEW_TOKENS
    # encoder context (audio_ctx.py): "full" (30 s, as Whisper), "auto" (fitted to the audio), a floor in s;
    # None: whoever runs the model decides (the server's --audio-ctx; full for a backend called directly)
    audio_ctx: str | float | None = None


# Evaluation must be deterministic and comparable: greedy, no sampling fallback, no silence skipping.
GREEDY = DecodeOptions(temperature=(0.0,), compression_ratio_threshold=None, log_prob_threshold=None,
                       no_speech_threshold=None, without_timestamps=True, max_new_tokens=128)



class Backend(Protocol):
    """What every front end (CLI, evaluation, export, server, UI, realtime) calls."""
    multilingual: bool
    languages: set[str]

    def transcribe(self, audio: np.ndarray | str | Path, language: str | None = None,
                   options: DecodeOptions = DecodeOptions(), vad: bool = False, batch_size: int = 8,
                   adapter: str | None = None) -> tuple[Iterator[Segment], TranscriptionInfo]:
        """Audio of any length, as samples or a path (read block by block); segments come lazily, each as
        soon as its 30 s window is decoded."""

    def transcribe_batch(self, audios: list[np.ndarray], languages: list[str | None] | None = None,
                         options: DecodeOptions = GREEDY, adapter: str | None = None
                         ) -> list[tuple[list[Segment], TranscriptionInfo]]:
        """Clips of at most 30 s decoded together; each comes back as segments with its info."""
