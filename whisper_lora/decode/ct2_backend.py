"""The CTranslate2 backend: faster-whisper's front end and decoding loop, behind the same Backend protocol.

Models come from `whisper-lora export --format ct2`, any faster-whisper folder, or the embedded default
(already CTranslate2). LoRA adapters cannot be applied to a CTranslate2 model: merge and export them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from ..constants import CHUNK_SECONDS, MAX_NEW_TOKENS, MAX_TARGET_TOKENS, TASK_PROMPT_TOKENS
from ..devices import ct2_placement
from ..errors import UserError
from . import longform
from .types import GREEDY, DecodeOptions, Segment, TranscriptionInfo, Word

ADAPTERS_REFUSED = ("CTranslate2 models cannot load LoRA adapters; merge each adapter (`whisper-lora merge`), "
                    "export it (`whisper-lora export`) and serve it as its own model, or use the transformers backend")


class CT2Backend:
    def __init__(self, model_dir: str, compute_type: str = "default", device: str = "auto", workers: int = 1,
                 dtype: str | None = None):
        """`device`, `dtype` and `compute_type` as the CLI takes them (`--device cuda:1`); see devices.py."""
        try:
            from faster_whisper import WhisperModel
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
    def _check(adapter: str | None) -> None:
        if adapter is not None:
            raise UserError(ADAPTERS_REFUSED)

    def _kwargs(self, options: DecodeOptions) -> dict:
        return dict(task=options.task, beam_size=options.num_beams, best_of=max(1, options.num_beams),
                    temperature=list(options.temperature),
                    compression_ratio_threshold=options.compression_ratio_threshold,
                    log_prob_threshold=options.log_prob_threshold, no_speech_threshold=options.no_speech_threshold,
                    initial_prompt=options.initial_prompt, condition_on_previous_text=options.condition_on_previous_text,
                    word_timestamps=options.word_timestamps, without_timestamps=options.without_timestamps,
                    prefix=options.prefix if options.without_timestamps else None,
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
    def _convert(s, offset: float, frames_offset: int) -> Segment:
        words = [Word(round(offset + w.start, 3), round(offset + w.end, 3), w.word, w.probability)
                 for w in s.words] if s.words else None
        return Segment(0, round(offset + s.start, 3), round(offset + s.end, 3), s.text.strip(), list(s.tokens),
                       s.avg_logprob, s.no_speech_prob, words, seek=frames_offset + s.seek, temperature=s.temperature,
                       compression_ratio=s.compression_ratio)

    def transcribe_batch(self, audios: list[np.ndarray], languages: list[str | None] | None = None,
                         options: DecodeOptions = GREEDY, adapter: str | None = None
                         ) -> list[tuple[list[Segment], TranscriptionInfo]]:
        self._check(adapter)
        out = []
        for audio, language in zip(audios, languages or [None] * len(audios)):
            seconds = round(len(audio) / 16000, 3)
            if longform.is_silent(audio):
                out.append(([], TranscriptionInfo(language if self.multilingual else "en", None, seconds)))
                continue
            segments, info = self.model.transcribe(audio, language=language, **self._kwargs(options))
            converted = [self._convert(s, 0.0, 0) for s in segments if s.text.strip()]
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
            language, prob, _ = self.model.detect_language(head)
        else:
            prob = None if self.multilingual else 1.0
        info = TranscriptionInfo(language if self.multilingual else "en", prob, duration)
        return self._blocks(source, duration, info.language, options, vad), info

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
                segments, _ = self.model.transcribe(block, language=language, vad_filter=vad, **self._kwargs(options))
                for s in segments:
                    if not s.text.strip():
                        continue
                    if held is not None:
                        held.id, next_id = next_id, next_id + 1
                        yield held
                    held = self._convert(s, position, round(position * 100))
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
