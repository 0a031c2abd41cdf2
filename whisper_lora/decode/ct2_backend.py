"""The CTranslate2 backend: faster-whisper's front end and decoding loop, behind the same Backend protocol,
its clips padded as Whisper was trained (`pad_as_trained`).

Models come from `whisper-lora export --format ct2`, any faster-whisper folder, or the embedded default
(already CTranslate2). LoRA adapters cannot be applied to a CTranslate2 model: merge and export them.

`--audio-ctx`: CTranslate2's encoder takes fewer than 3,000 frames (its output then has half as many
positions), but faster-whisper pads every window to 3,000 before encoding and has no setting for it, so
its `encode` is overridden to keep the first frames of the window. Which window it encodes is not known
there; the context is set per input from its length, so it applies to input of at most 30 s (one
window: clips, requests, realtime buffers) and longer input stays at `full`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import threading
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from ..constants import (CHUNK_SECONDS, FRAMES_PER_SECOND, MAX_NEW_TOKENS, MAX_TARGET_TOKENS, N_FRAMES, SAMPLE_RATE,
                         TASK_PROMPT_TOKENS)
from ..devices import ct2_placement
from ..errors import UserError
from ..features import LOG_FLOOR_BELOW_MAX
from . import longform
from ..audio_ctx import FULL, encoder_frames
from .types import GREEDY, DecodeOptions, Segment, TranscriptionInfo, Word

ADAPTERS_REFUSED = ("CTranslate2 models cannot load LoRA adapters; merge each adapter (`whisper-lora merge`), "
                    "export it (`whisper-lora export`) and serve it as its own model, or use the transformers backend")


_context = threading.local()  # .window: the _Window of the input this thread is transcribing


@dataclass
class _Window:
    """How an input's windows reach the encoder: `frames` of context (None: faster-whisper's 3,000) and the
    padding, as the transformers backend pads the same input: clips as trained (`pad_as_trained`), the
    sequential long-form loop with zeros in the spectrogram, as openai/whisper's `transcribe` (and
    faster-whisper) pad it. `--vad` input keeps faster-whisper's padding: its VAD joins the speech into one
    input, a path unlike ours. `floor`: a clip's log floor, from its first window, which holds all of it (a
    later window of the clip, after a cut at a timestamp, is padded at the clip's floor, not its own)."""
    frames: int | None = None
    as_trained: bool = False
    floor: float | None = None


def _audio_ends(batch: np.ndarray) -> np.ndarray:
    """Per row of (batch, mels, frames): the frames before faster-whisper's trailing padding (a frame of real
    audio is never exactly 0.0 in every bin; a row of nothing but zeros counts as unpadded)."""
    heard = np.any(batch != 0.0, axis=1)
    return np.where(heard.any(axis=1), batch.shape[-1] - np.argmax(heard[:, ::-1], axis=1), batch.shape[-1])


def log_floor(features: np.ndarray) -> float:
    """A clip's log floor (the maximum of its real frames - 2), from a window that holds all of it. Not the
    window's plain maximum: quiet audio's frames all lie below the padding's 0.0."""
    batch = features if features.ndim == 3 else features[None]
    return max(float(row[:, :end].max()) for row, end in zip(batch, _audio_ends(batch)) if end) - LOG_FLOOR_BELOW_MAX


def pad_as_trained(features: np.ndarray, floor: float) -> np.ndarray:
    """A clip's window padded as Whisper was trained on it. faster-whisper pads a window shorter than 30 s
    with log-mel frames of 0.0; training pads the *audio* with zeros, whose frames sit at the log floor (the
    spectrogram's maximum - 2, `log_floor`), and so do our transformers backend's clips, openai-whisper's decode
    of a clip and whisper.cpp. A model near a decision hears the difference: the demo's fine-tuned adapter gave
    other words on 6 of 40 clips in faster-whisper as shipped, none with this (faster-whisper declined the change
    upstream: SYSTRAN/faster-whisper#1084). Applied where the transformers backend pads audio (`_Window`)."""
    batch = features if features.ndim == 3 else features[None]
    ends = _audio_ends(batch)
    if (ends == batch.shape[-1]).all():
        return features
    batch = batch.copy()
    for row, end in zip(batch, ends):
        row[:, end:] = floor
    return batch if features.ndim == 3 else batch[0]


def _model_class():
    """faster-whisper's WhisperModel, each window padded and cut to its encoder context as `_context.window`
    says."""
    from faster_whisper import WhisperModel

    class FittedContextModel(WhisperModel):
        def encode(self, features):
            window = getattr(_context, "window", None) or _Window()
            if window.as_trained:
                if window.floor is None:  # the clip's first window: all of its frames
                    window.floor = log_floor(features)
                features = pad_as_trained(features, window.floor)
            if window.frames is not None:
                features = np.ascontiguousarray(features[..., :window.frames])
            return super().encode(features)

    return FittedContextModel


class CT2Backend:
    def __init__(self, model_dir: str, compute_type: str = "default", device: str = "auto", workers: int = 1,
                 dtype: str | None = None):
        """`device`, `dtype` and `compute_type` as the CLI takes them (`--device cuda:1`); see devices.py."""
        try:
            WhisperModel = _model_class()
        except ImportError:
            raise UserError("--backend ct2 needs faster-whisper: pip install 'whisper-lora[ct2]'") from None
        kind, index, compute_type = ct2_placement(device, dtype, compute_type)
        try:
            self.model = WhisperModel(model_dir, device=kind, device_index=index, compute_type=compute_type,
                                      num_workers=workers)
        except ValueError as exc:  # e.g. float16 on a CPU
            raise UserError(f"cannot load with --compute-type {compute_type}: {exc}", model_dir) from None
        self.multilingual = self.model.model.is_multilingual
        self.languages = set(self.model.supported_languages)

    @staticmethod
    def _window(audio_seconds: float, options: DecodeOptions, as_trained: bool) -> _Window:
        """The encoder's view of an input of this length (`as_trained`: where the transformers backend pads
        its audio)."""
        frames = round(audio_seconds * FRAMES_PER_SECOND)
        if options.audio_ctx in (None, FULL) or frames > N_FRAMES:
            return _Window(None, as_trained)
        return _Window(encoder_frames(frames, options.audio_ctx), as_trained)

    @staticmethod
    @contextmanager
    def _fitted(window: _Window):
        previous, _context.window = getattr(_context, "window", None), window
        try:
            yield
        finally:
            _context.window = previous

    def _segments(self, segments, window: _Window):
        """faster-whisper's lazy segments, each pulled with this input's context set: the caller may
        interleave several inputs' generators in one thread."""
        iterator = iter(segments)
        while True:
            with self._fitted(window):
                segment = next(iterator, None)
            if segment is None:
                return
            yield segment

    @staticmethod
    def _check(adapter: str | None) -> None:
        if adapter is not None:
            raise UserError(ADAPTERS_REFUSED)

    def _kwargs(self, options: DecodeOptions, seconds: float) -> dict:
        # Without timestamps faster-whisper reads each 30 s window of longer audio as one segment and
        # loses most of its words (71.9% WER on the inference benchmark's long files, 12.1% with them):
        # longer audio always has them, as in the transformers backend.
        without_timestamps = options.without_timestamps and seconds <= CHUNK_SECONDS
        return dict(task=options.task, beam_size=options.num_beams, best_of=max(1, options.num_beams),
                    temperature=list(options.temperature),
                    compression_ratio_threshold=options.compression_ratio_threshold,
                    log_prob_threshold=options.log_prob_threshold, no_speech_threshold=options.no_speech_threshold,
                    initial_prompt=options.initial_prompt, condition_on_previous_text=options.condition_on_previous_text,
                    word_timestamps=options.word_timestamps, without_timestamps=without_timestamps,
                    prefix=options.prefix if without_timestamps else None,
                    max_new_tokens=self._max_new_tokens(options))

    def _max_new_tokens(self, options: DecodeOptions) -> int | None:
        """faster-whisper refuses prompt + max_new_tokens over the 448-token context instead of capping, so
        the limit is cut to the room its longest possible prompt leaves: <|startofprev|>, up to 223 tokens
        of earlier text (the initial prompt, or any previous window's text when conditioning on it), the
        4-token task prompt, up to 223 tokens of forced prefix. The full default is None, its own
        "up to the context"."""
        if options.max_new_tokens >= MAX_NEW_TOKENS:
            return None
        half = MAX_TARGET_TOKENS // 2 - 1

        def count(text: str | None) -> int:
            return min(half, len(self.model.hf_tokenizer.encode(" " + text.strip(), add_special_tokens=False).ids)) \
                if text and text.strip() else 0

        history = half if options.condition_on_previous_text else count(options.initial_prompt)
        prefix = count(options.prefix) if options.without_timestamps else 0
        room = MAX_TARGET_TOKENS - (1 if history else 0) - history - TASK_PROMPT_TOKENS - prefix
        return max(1, min(options.max_new_tokens, room))

    @staticmethod
    def _convert(s, offset: float, frames_offset: int, audio_end: float) -> Segment:
        """A faster-whisper segment in input seconds, its times inside the audio (at a short context
        faster-whisper may write a timestamp past the audio: it has no setting to suppress them)."""
        def at(t: float) -> float:
            return round(min(float(offset + t), audio_end), 3)

        words = [Word(at(w.start), at(w.end), w.word, w.probability) for w in s.words] if s.words else None
        return Segment(0, at(s.start), at(s.end), s.text.strip(), list(s.tokens),
                       s.avg_logprob, s.no_speech_prob, words, seek=frames_offset + s.seek, temperature=s.temperature,
                       compression_ratio=s.compression_ratio)

    def transcribe_batch(self, audios: list[np.ndarray], languages: list[str | None] | None = None,
                         options: DecodeOptions = GREEDY, adapter: str | None = None
                         ) -> list[tuple[list[Segment], TranscriptionInfo]]:
        self._check(adapter)
        out = []
        for audio, language in zip(audios, languages or [None] * len(audios)):
            seconds = round(len(audio) / SAMPLE_RATE, 3)
            if longform.is_silent(audio):
                out.append(([], TranscriptionInfo(language if self.multilingual else "en", None, seconds)))
                continue
            window = self._window(len(audio) / SAMPLE_RATE, options, as_trained=seconds <= CHUNK_SECONDS)
            with self._fitted(window):  # language detection encodes too
                segments, info = self.model.transcribe(audio, language=language,
                                                       **self._kwargs(options, len(audio) / SAMPLE_RATE))
            converted = [self._convert(s, 0.0, 0, seconds) for s in self._segments(segments, window) if s.text.strip()]
            for n, segment in enumerate(converted):
                segment.id = n
            out.append((converted, TranscriptionInfo(info.language, info.language_probability, seconds)))
        return out

    def transcribe(self, audio: np.ndarray | str | Path, language: str | None = None,
                   options: DecodeOptions = DecodeOptions(), vad: bool = False, batch_size: int = 8,
                   adapter: str | None = None) -> tuple[Iterator[Segment], TranscriptionInfo]:
        self._check(adapter)
        source, duration = longform.open_source(audio)
        if language is None and self.multilingual:
            head = longform.read_block(source, 0.0, min(duration, CHUNK_SECONDS))
            with self._fitted(self._window(duration, options, self._clip_like(duration, options, vad))):
                language, prob, _ = self.model.detect_language(head)
        else:
            prob = None if self.multilingual else 1.0
        info = TranscriptionInfo(language if self.multilingual else "en", prob, duration)
        return self._blocks(source, duration, info.language, options, vad), info

    @staticmethod
    def _clip_like(duration: float, options: DecodeOptions, vad: bool) -> bool:
        """Input the transformers backend decodes as one clip (its audio padded), not with its sequential loop."""
        return duration <= CHUNK_SECONDS and options.without_timestamps and not vad

    def _blocks(self, source, duration: float, language: str | None, options: DecodeOptions,
                vad: bool) -> Iterator[Segment]:
        """faster-whisper over blocks of BLOCK_SECONDS, its segments passed on as it yields them. A block
        that does not end the input holds its last segment back (the block edge may cut it) and the next
        block starts there."""
        position, next_id = 0.0, 0
        while position < duration - longform.END_TOLERANCE:
            end = min(duration, position + longform.BLOCK_SECONDS)
            final = end >= duration - longform.END_TOLERANCE
            block = longform.read_block(source, position, end)
            held = None
            if not longform.is_silent(block):
                window = self._window(duration, options, self._clip_like(duration, options, vad))
                segments, _ = self.model.transcribe(block, language=language, vad_filter=vad,
                                                    **self._kwargs(options, len(block) / SAMPLE_RATE))
                for s in self._segments(segments, window):
                    if not s.text.strip():
                        continue
                    if held is not None:
                        held.id, next_id = next_id, next_id + 1
                        yield held
                    held = self._convert(s, position, round(position * 100), end)
            if not final and held is not None and held.start > position + 1.0:
                position = held.start  # the next block decodes it again, whole
                continue
            if held is not None:
                held.id, next_id = next_id, next_id + 1
                yield held
            if final:
                return
            advanced = held.end if held is not None else end
            position = advanced if advanced > position + 1.0 else end  # always make progress
