"""Audio of any length -> 30 s windows -> segments: openai/whisper's sequential algorithm, VAD windows,
and batches of short clips.

Long audio is read from disk in blocks of BLOCK_SECONDS, so memory does not grow with the input, and
segments are yielded as each window is decoded. A block that does not end the input stops before a
window would cross its edge; the next block starts where decoding stopped, so every window but the
input's last holds a full 30 s and no word is cut at a block edge.

The model work (features, encoder, search, alignment) goes through a `WindowModel`, so the same
algorithms run directly on a model or through the service's batcher, which merges the windows of
concurrent calls.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from ..audio import audio_duration, load_audio
from ..constants import FRAMES_PER_SECOND, HOP_LENGTH, N_FRAMES, SAMPLE_RATE, TIME_PRECISION
from ..tokens import SpecialTokens
from ..audio_ctx import AudioContext, encoder_frames
from .alignatt import AlignAttResult
from .search import WindowResult, is_silence
from .timing import WordTiming, assign_words, words_from_attention
from .types import DecodeOptions, Segment, TranscriptionInfo, Word

BLOCK_SECONDS = 300  # seconds of audio read and turned into features at a time (bounds memory)
END_TOLERANCE = 0.05  # seconds: less than this left of the input is not another window
SILENCE_RMS = 1e-3  # -60 dBFS: below this a clip is silence; Whisper would invent "you" or "Thank you."
# A VAD window whose decoding stops before this much of a speech region is left is decoded again
# from that point: Whisper ends a dense window early now and then, and the tail would be lost.
VAD_RETRY_SECONDS = 1.0
VAD_RETRY_ROUNDS = 2


class WindowModel(Protocol):
    """The model work the algorithms need; `adapter` names the LoRA adapter of the whole call."""
    tokens: SpecialTokens

    def features(self, audios: list[np.ndarray]) -> torch.Tensor:
        """(batch, n_mels, 3000) log-mel of clips of at most 30 s, each padded to 30 s of audio."""

    def block_features(self, audio: np.ndarray) -> tuple[torch.Tensor, int]:
        """(n_mels, frames) log-mel of a block of any length, and how many frames hold audio."""

    def encode(self, features: torch.Tensor, adapter: str | None) -> torch.Tensor: ...

    def detect(self, encoded: torch.Tensor, adapter: str | None) -> list[tuple[str, float]]: ...

    def decode(self, encoded: torch.Tensor, prefixes: list[list[int]], options: DecodeOptions, timestamps: bool,
               adapter: str | None) -> list[WindowResult]: ...

    def align(self, encoded: torch.Tensor, text_tokens: list[int], language: str | None, task: str,
              num_frames: int, adapter: str | None) -> list[WordTiming]: ...

    def alignatt(self, encoded: torch.Tensor, prefix: list[int], forced: int, content: int, final: bool,
                 max_new: int, language: str | None, start_position: int, threshold: int,
                 adapter: str | None) -> AlignAttResult: ...


def content_frames(audio: np.ndarray) -> int:
    """Log-mel frames that hold the clip's audio (the rest of its 30 s window is padding)."""
    return min(N_FRAMES, -(-len(audio) // HOP_LENGTH))


def clip_features(model: WindowModel, audios: list[np.ndarray], audio_ctx: AudioContext | None) -> torch.Tensor:
    """The encoder's input for clips batched together, each padded to 30 s and cut to the longest one's
    context (a row given more context than it needs reads as it would at a larger floor; rows of one
    batch must share a length)."""
    context = max(encoder_frames(content_frames(a), audio_ctx) for a in audios)
    return model.features(audios)[..., :context]


def window_features(mel: torch.Tensor, audio_ctx: AudioContext | None) -> torch.Tensor:
    """The encoder's input for one window of a block's spectrogram (its frames that hold audio, at most
    30 s): padded to its context, as openai/whisper pads it to 30 s."""
    size = min(N_FRAMES, mel.shape[-1])
    return F.pad(mel[:, :size], (0, encoder_frames(size, audio_ctx) - size))[None]


def is_silent(audio: np.ndarray) -> bool:
    return audio.size == 0 or float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) < SILENCE_RMS


def open_source(audio: np.ndarray | str | Path) -> tuple[np.ndarray | Path, float]:
    """Samples stay in memory; a path is only probed here and read block by block later."""
    source = Path(audio) if isinstance(audio, (str, Path)) else audio
    return source, audio_duration(source) if isinstance(source, Path) else len(source) / SAMPLE_RATE


def read_block(source: np.ndarray | Path, start: float, end: float) -> np.ndarray:
    if isinstance(source, np.ndarray):
        return source[int(start * SAMPLE_RATE): int(end * SAMPLE_RATE)]
    return load_audio(source, start, end)


@dataclass
class Piece:
    """A segment while it is being built: times in seconds of the decoded audio (block or window)."""
    start: float
    end: float
    tokens: list[int]  # timestamp tokens included
    words: list[WordTiming] | None = None
    logprobs: list[float] | None = None  # of each of `tokens`


def split_window(tokens: SpecialTokens, sampled: list[int], time_offset: float,
                 window_seconds: float, logprobs: list[float] | None = None) -> tuple[list[Piece], float, bool]:
    """Cut a window's tokens into segments at its timestamp pairs (openai/whisper's rules).

    Returns the segments with text, how far into the window they reach for the next window to start
    from (all of it after a single closing timestamp), and whether that was the ending.
    """
    begin = tokens.timestamp_begin
    is_stamp = [t >= begin for t in sampled]
    single_ending = is_stamp[-2:] == [False, True]
    consecutive = [i + 1 for i in range(len(sampled) - 1) if is_stamp[i] and is_stamp[i + 1]]
    pieces = []
    if consecutive:
        slices = consecutive + ([len(sampled)] if single_ending else [])
        last = 0
        for current in slices:
            part = sampled[last:current]
            pieces.append(Piece(time_offset + (part[0] - begin) * TIME_PRECISION,
                                time_offset + (part[-1] - begin) * TIME_PRECISION, part,
                                logprobs=None if logprobs is None else logprobs[last:current]))
            last = current
        consumed = window_seconds if single_ending else (sampled[last - 1] - begin) * TIME_PRECISION
    else:
        stamps = [t for t in sampled if t >= begin]
        end = (stamps[-1] - begin) * TIME_PRECISION if stamps and stamps[-1] != begin else window_seconds
        pieces.append(Piece(time_offset, time_offset + end, sampled, logprobs=logprobs))
        consumed = window_seconds
    return [p for p in pieces if tokens.decode(p.tokens).strip()], consumed, single_ending


def make_segment(tokens: SpecialTokens, piece: Piece, result: WindowResult, to_time, seek: int,
                 with_words: bool = True) -> Segment:
    """A finished Segment; `to_time(t, is_end)` turns a decoded-audio time into input seconds."""
    start = to_time(piece.start, False)
    end = max(start, to_time(piece.end, True))
    words = None
    if piece.words is not None and with_words:
        # Words stay inside their segment and in order, whatever the heuristics did.
        words, floor = [], start
        for w in piece.words:
            w_start = min(max(to_time(w.start, False), floor), end)
            w_end = min(max(to_time(w.end, True), w_start), end)
            words.append(Word(round(w_start, 3), round(w_end, 3), w.word, round(w.probability, 4)))
            floor = w_start
    text_logprobs = None if piece.logprobs is None else \
        [lp for t, lp in zip(piece.tokens, piece.logprobs) if t < tokens.eot]
    return Segment(0, round(start, 3), round(end, 3), tokens.decode(piece.tokens).strip(),
                   [t for t in piece.tokens if t < tokens.eot], result.avg_logprob, result.no_speech_prob, words,
                   seek=seek, temperature=result.temperature, compression_ratio=round(result.compression_ratio, 4),
                   token_logprobs=text_logprobs)


def _text_tokens(pieces: list[Piece], eot: int) -> list[int]:
    return [t for p in pieces for t in p.tokens if t < eot]


def _decoded_as_aligned(tokens: SpecialTokens, result: WindowResult, prefix: list[int], text: list[int],
                        language: str | None, task: str) -> bool:
    """Whether the decode recorded the attention of the very sequence `find_alignment` would run: the plain
    text-only prompt (no previous text, no forced prefix) and the text as sampled, ended by end-of-text."""
    return (result.attention is not None and prefix == tokens.prompt(language, task, timestamps=False)
            and text == result.tokens)


def _time_in(offset: float, length: float):
    """Window time -> input time for a window that starts `offset` s into the input and holds `length` s."""
    return lambda t, is_end: offset + min(max(t, 0.0), length)


def sequential(model: WindowModel, source: np.ndarray | Path, duration: float, language: str | None,
               options: DecodeOptions, adapter: str | None = None,
               first_window: tuple[torch.Tensor, torch.Tensor] | None = None) -> Iterator[Segment]:
    """openai/whisper's transcribe loop: decode 30 s from `seek`, keep the segments closed by a timestamp
    pair, continue from the last one; yields each window's segments as soon as it is decoded.

    `first_window`: (features, encoded) of the input's first window when language detection computed them.
    """
    tokens = model.tokens
    history = tokens.prompt_ids(options.initial_prompt)  # primes the first window only, as openai/whisper
    reset_since, last_speech, next_id, position = 0, 0.0, 0, 0.0
    while position < duration - END_TOLERANCE:
        block_end = min(duration, position + BLOCK_SECONDS)
        final = block_end >= duration - END_TOLERANCE
        audio = read_block(source, position, block_end)
        if is_silent(audio):
            position = block_end
            continue
        mel, content_frames = model.block_features(audio)
        block_seconds = len(audio) / SAMPLE_RATE
        seek = 0
        while seek < content_frames:
            if not final and content_frames - seek < N_FRAMES:
                break  # the next block goes on from here with a whole window
            size = min(N_FRAMES, content_frames - seek)
            time_offset = seek / FRAMES_PER_SECOND
            if first_window is not None and position == 0 and seek == 0:
                encoded = first_window[1]
            else:
                encoded = model.encode(window_features(mel[:, seek:seek + size], options.audio_ctx), adapter)
            if language is None:
                language = model.detect(encoded, adapter)[0][0]
            prefix = tokens.prefix(language, options.task, True, history[reset_since:])
            (result,) = model.decode(encoded, [prefix], options, True, adapter)
            window_seek = round(position * FRAMES_PER_SECOND) + seek
            if is_silence(result, options):
                seek += size
                continue
            pieces, consumed, single_ending = split_window(tokens, result.tokens, time_offset, size / FRAMES_PER_SECOND,
                                                           result.token_logprobs)
            seek += max(1, round(consumed * FRAMES_PER_SECOND))
            if options.word_timestamps and pieces:
                alignment = model.align(encoded[0], _text_tokens(pieces, tokens.eot), language, options.task, size,
                                        adapter)
                last_speech = assign_words(pieces, alignment, tokens.eot, time_offset, last_speech)
                words_end = next((p.words[-1].end for p in reversed(pieces) if p.words), None)
                if not single_ending and words_end is not None and words_end > time_offset:
                    # an unfinished window continues after its last aligned word, as openai/whisper
                    seek = max(round(time_offset * FRAMES_PER_SECOND) + 1, round(words_end * FRAMES_PER_SECOND))
            to_time = _time_in(position, block_seconds)
            for piece in pieces:
                segment = make_segment(tokens, piece, result, to_time, window_seek)
                segment.id, next_id = next_id, next_id + 1
                yield segment
            history += [t for p in pieces for t in p.tokens]
            if not options.condition_on_previous_text or result.temperature > 0.5:
                reset_since = len(history)  # a hot window's text is no prompt for the next
        if final:
            return
        advanced = seek / FRAMES_PER_SECOND
        last_speech = max(0.0, last_speech - advanced)  # word heuristics count from the next block's start
        position += advanced


def _resolve_languages(model: WindowModel, encoded: torch.Tensor, languages: list[str | None],
                       adapter: str | None) -> list[tuple[str | None, float | None]]:
    if not model.tokens.multilingual:
        return [("en", 1.0)] * len(languages)
    unknown = [i for i, lang in enumerate(languages) if lang is None]
    detected = dict(zip(unknown, model.detect(encoded[unknown], adapter))) if unknown else {}
    return [detected.get(i, (lang, None)) for i, lang in enumerate(languages)]


def clips(model: WindowModel, audios: list[np.ndarray], languages: list[str | None], options: DecodeOptions,
          adapter: str | None = None, encoded: torch.Tensor | None = None) -> list[tuple[list[Segment], TranscriptionInfo]]:
    """Clips of at most 30 s decoded together in one window each; silent clips give no segment.

    Without timestamps a clip is one segment spanning it (fewer tokens to decode); with them, its
    segments come from the timestamp tokens, and words (if asked for) from the alignment heads.
    `encoded`: the voiced clips' encoder output, when language detection already computed it.
    """
    tokens = model.tokens
    out: list[tuple[list[Segment], TranscriptionInfo]] = [
        ([], TranscriptionInfo(lang if tokens.multilingual else "en", None, round(len(a) / SAMPLE_RATE, 3)))
        for a, lang in zip(audios, languages)]
    voiced = [i for i, a in enumerate(audios) if not is_silent(a)]
    if not voiced:
        return out
    timestamps = not options.without_timestamps
    if encoded is None:
        heard = [audios[i] for i in voiced]
        encoded = model.encode(clip_features(model, heard, options.audio_ctx), adapter)
    resolved = _resolve_languages(model, encoded, [languages[i] for i in voiced], adapter)
    prompt = tokens.prompt_ids(options.initial_prompt)
    forced = tokens.prompt_ids(options.prefix) if not timestamps else []  # decoded as given, not searched
    prefixes = [tokens.prefix(lang, options.task, timestamps, prompt) + forced for lang, _ in resolved]
    results = model.decode(encoded, prefixes, options, timestamps, adapter)
    for row, (i, (lang, prob), result) in enumerate(zip(voiced, resolved, results)):
        seconds = len(audios[i]) / SAMPLE_RATE
        out[i] = ([], TranscriptionInfo(lang, prob, round(seconds, 3)))
        if is_silence(result, options):
            continue
        if timestamps:
            pieces, _, _ = split_window(tokens, result.tokens, 0.0, seconds, result.token_logprobs)
        else:
            sampled = [(t, lp) for t, lp in zip(result.tokens, result.token_logprobs or [0.0] * len(result.tokens))
                       if t < tokens.eot]
            # a forced prefix was given, not chosen: log-probability 0
            pieces = [Piece(0.0, seconds, forced + [t for t, _ in sampled],
                            logprobs=None if result.token_logprobs is None
                            else [0.0] * len(forced) + [lp for _, lp in sampled])]
            if not tokens.decode(pieces[0].tokens).strip():
                continue
        if options.word_timestamps and pieces:
            text, frames = _text_tokens(pieces, tokens.eot), round(seconds * FRAMES_PER_SECOND)
            if _decoded_as_aligned(tokens, result, prefixes[row], text, lang, options.task):
                alignment = words_from_attention(tokens, result.attention, result.text_probs, text, lang, frames,
                                                 len(prefixes[row]))
            else:
                alignment = model.align(encoded[row], text, lang, options.task, frames, adapter)
            assign_words(pieces, alignment, tokens.eot, 0.0, 0.0)
        to_time = _time_in(0.0, seconds)
        segments = [make_segment(tokens, p, result, to_time, 0) for p in pieces]
        for n, segment in enumerate(segments):
            segment.id = n
        out[i] = (segments, out[i][1])
    return out


def vad_segments(model: WindowModel, source: np.ndarray | Path, duration: float, language: str | None,
                 options: DecodeOptions, batch_size: int, adapter: str | None = None) -> Iterator[Segment]:
    """Only speech is decoded: Silero VAD regions packed into 30 s windows (pauses kept, long silences
    shortened), decoded `batch_size` at a time with timestamps; silence yields nothing. Each batch's
    segments are yielded as soon as it (and its retries) are decoded."""
    from .. import vad

    tokens = model.tokens
    prompt = tokens.prompt_ids(options.initial_prompt)  # every window, as faster-whisper's batched mode
    next_id, position = 0, 0.0
    while position < duration - END_TOLERANCE:
        block_end = min(duration, position + BLOCK_SECONDS)
        final = block_end >= duration - END_TOLERANCE
        block = read_block(source, position, block_end)
        windows = vad.speech_windows(vad.speech_regions(block), len(block) / SAMPLE_RATE)
        resume_at = block_end
        if not final and len(windows) > 1 and windows[-1].spans[0].start > 0:
            # The last window may be cut by the block edge: the next block starts with it, whole.
            resume_at = position + windows[-1].spans[0].start
            windows = windows[:-1]
        for first in range(0, len(windows), batch_size):
            segments = _decode_vad_batch(model, windows[first:first + batch_size], block, position, language,
                                         options, prompt, adapter)
            for segment in sorted(segments, key=lambda s: (s.start, s.end)):
                segment.id, next_id = next_id, next_id + 1
                yield segment
        position = resume_at


def _decode_vad_batch(model: WindowModel, windows: list, block: np.ndarray, offset: float, language: str | None,
                      options: DecodeOptions, prompt: list[int], adapter: str | None) -> list[Segment]:
    tokens = model.tokens
    segments: list[Segment] = []
    for attempt in range(VAD_RETRY_ROUNDS + 1):
        clips_ = [w.samples(block) for w in windows]
        encoded = model.encode(clip_features(model, clips_, options.audio_ctx), adapter)
        lang = language or model.detect(encoded[:1], adapter)[0][0]
        prefix = tokens.prefix(lang, options.task, True, prompt)
        results = model.decode(encoded, [prefix] * len(windows), options, True, adapter)
        unfinished = []
        for row, (window, clip, result) in enumerate(zip(windows, clips_, results)):
            if is_silence(result, options):
                continue
            seconds = len(clip) / SAMPLE_RATE
            pieces, consumed, _ = split_window(tokens, result.tokens, 0.0, seconds, result.token_logprobs)
            if not pieces:
                continue
            decoded_until = pieces[-1].end
            if options.word_timestamps or len(window.spans) > 1:
                # Across a cut-out pause segment times come from the words: Whisper's own timestamps
                # there are often on the wrong side of it, by as long as it was.
                alignment = model.align(encoded[row], _text_tokens(pieces, tokens.eot), lang, options.task,
                                        round(seconds * FRAMES_PER_SECOND), adapter)
                assign_words(pieces, alignment, tokens.eot, 0.0, 0.0)
            segments += [make_segment(tokens, p, result, lambda t, is_end, w=window: offset + w.to_original(t, is_end),
                                      round((offset + window.spans[0].start) * FRAMES_PER_SECOND),
                                      with_words=options.word_timestamps) for p in pieces]
            # Whisper sometimes ends a dense window early, or leaves its last segment open: what VAD
            # heard after the last closed segment (an unfinished segment, a whole later region, or a
            # long rest of this one) is decoded again in a new window.
            later, left = window.unheard(decoded_until)
            rest = window.after(decoded_until)
            if rest and (consumed < seconds or later or left >= VAD_RETRY_SECONDS):
                unfinished.append(rest)
        windows = unfinished
        if not windows or attempt == VAD_RETRY_ROUNDS:
            break
    return segments
