"""The one inference core: audio in, typed `Segment`s out.

`transcribe()` returns `(segments, info)` where `segments` is a lazy iterator, as in faster-whisper;
the CLI consumes it today and the server, web UI and realtime front ends will consume the same shape.
`decode_batch()` is the batched short-clip path used by evaluation and by batch transcription.

Two backends share that interface: `Transcriber` (transformers; any model, LoRA adapters included)
and `CT2Transcriber` (CTranslate2 through faster-whisper). Long audio is read and decoded in blocks
of BLOCK_SECONDS, each block continuing where the last complete segment of the previous one ended,
so peak memory does not grow with the length of the input and no word is cut at a block edge.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .audio import CHUNK_SECONDS, SAMPLE_RATE, audio_duration, load_audio
from .data import log_mel

BLOCK_SECONDS = 300  # seconds of audio decoded per block of long-form transcription (bounds memory)
MAX_TARGET_TOKENS = 448  # Whisper decoder context, prompt included
SILENCE_RMS = 1e-3  # -60 dBFS: below this a clip is silence; Whisper would invent "you" or "Thank you."


def is_silent(audio: np.ndarray) -> bool:
    return audio.size == 0 or float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) < SILENCE_RMS


@dataclass
class Word:
    start: float
    end: float
    word: str
    probability: float


@dataclass
class Segment:
    id: int
    start: float  # seconds from the start of the input audio
    end: float  # seconds
    text: str
    tokens: list[int] = field(default_factory=list)
    avg_logprob: float | None = None
    no_speech_prob: float | None = None
    words: list[Word] | None = None


@dataclass
class TranscriptionInfo:
    language: str | None
    language_probability: float | None
    duration: float  # seconds of input audio


@dataclass
class Decoded:
    text: str
    tokens: list[int]
    language: str | None
    language_probability: float | None


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
    condition_on_previous_text: bool = False  # off: a loop in one window cannot leak into the next
    word_timestamps: bool = False
    max_new_tokens: int = 440


# Evaluation must be deterministic and comparable: greedy, no sampling fallback, no silence skipping.
GREEDY = DecodeOptions(temperature=(0.0,), compression_ratio_threshold=None, log_prob_threshold=None,
                       no_speech_threshold=None, max_new_tokens=128)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _read_block(source: np.ndarray | Path, start: float, end: float) -> np.ndarray:
    if isinstance(source, np.ndarray):
        return source[int(start * SAMPLE_RATE): int(end * SAMPLE_RATE)]
    return load_audio(source, start, end)


def _open_source(audio: np.ndarray | str | Path) -> tuple[np.ndarray | Path, float]:
    """Samples stay in memory; a path is only probed here and read block by block later."""
    source = Path(audio) if isinstance(audio, (str, Path)) else audio
    return source, audio_duration(source) if isinstance(source, Path) else len(source) / SAMPLE_RATE


def transcribe_in_blocks(decode_window, source: np.ndarray | Path, duration: float) -> Iterator[Segment]:
    """Drive a backend's `decode_window(audio, offset) -> list[Segment]` over long audio block by block.

    A block that does not reach the end of the input keeps all segments but its last one, which may
    be cut by the block edge; the next block starts where the kept segments end.
    """
    position, next_id = 0.0, 0
    while position < duration - 0.05:
        end = min(duration, position + BLOCK_SECONDS)
        segments = decode_window(_read_block(source, position, end), position)
        last_block = end >= duration - 0.05
        if not last_block and len(segments) > 1:
            segments = segments[:-1]
        for segment in segments:
            yield replace(segment, id=next_id)
            next_id += 1
        if last_block:
            return
        advanced = segments[-1].end if segments else end
        position = advanced if advanced > position + 1.0 else end  # always make progress


class Transcriber:
    """Wraps a (possibly LoRA-adapted) transformers Whisper model for decoding."""

    def __init__(self, model, processor, device: str | None = None, compile: bool = False):
        self.device = device or default_device()
        self.model = model.to(self.device).eval()
        if compile:
            self.model.forward = torch.compile(self.model.forward)
        self.processor = processor
        self.generation_config = self._base_model().generation_config
        self.multilingual = bool(getattr(self.generation_config, "is_multilingual", False))
        lang_to_id = getattr(self.generation_config, "lang_to_id", None) or {}
        self.languages = {token[2:-2] for token in lang_to_id} if self.multilingual else {"en"}
        self._language_ids = torch.tensor(list(lang_to_id.values()), dtype=torch.long)
        self._language_codes = [token[2:-2] for token in lang_to_id]

    def _base_model(self):
        model = self.model
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def features(self, audios: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack([log_mel(self.processor, a) for a in audios])).to(self.device, self.dtype)

    @torch.inference_mode()
    def detect_language(self, features: torch.Tensor) -> list[tuple[str, float]]:
        """Most likely language and its probability per clip, from the first decoder step."""
        model = self._base_model()
        encoder_out = model.get_encoder()(features).last_hidden_state
        start = torch.full((len(features), 1), self.generation_config.decoder_start_token_id, device=self.device)
        logits = model(encoder_outputs=(encoder_out,), decoder_input_ids=start).logits[:, -1]
        probs = logits[:, self._language_ids.to(self.device)].float().softmax(-1)
        best = probs.argmax(-1)
        return [(self._language_codes[int(b)], float(probs[i, b])) for i, b in enumerate(best)]

    def _language_for(self, features: torch.Tensor, languages: list[str | None]) -> list[tuple[str | None, float | None]]:
        if not self.multilingual:
            return [("en", 1.0)] * len(languages)
        unknown = [i for i, lang in enumerate(languages) if lang is None]
        detected = dict(zip(unknown, self.detect_language(features[unknown]))) if unknown else {}
        return [detected.get(i, (lang, None)) for i, lang in enumerate(languages)]

    def _generate_kwargs(self, options: DecodeOptions, languages: list[str | None] | str | None) -> dict:
        kwargs = {"num_beams": options.num_beams, "max_new_tokens": options.max_new_tokens,
                  "temperature": options.temperature if len(options.temperature) > 1 else options.temperature[0],
                  "do_sample": False, "condition_on_prev_tokens": options.condition_on_previous_text}
        if options.compression_ratio_threshold is not None:
            kwargs["compression_ratio_threshold"] = options.compression_ratio_threshold
        if options.log_prob_threshold is not None:
            kwargs["logprob_threshold"] = options.log_prob_threshold
            if options.no_speech_threshold is not None:  # transformers uses it only with a log-prob threshold
                kwargs["no_speech_threshold"] = options.no_speech_threshold
        # The decoder holds 448 tokens: the 4-token prompt, any text prompt and the carried-over
        # previous text (at most half the context) all come out of the generation budget.
        budget = MAX_TARGET_TOKENS - 4
        if options.initial_prompt:
            prompt_ids = self.processor.tokenizer.get_prompt_ids(options.initial_prompt)
            prompt_ids = prompt_ids[-(MAX_TARGET_TOKENS // 2):]  # as openai/whisper: keep the end
            kwargs["prompt_ids"] = torch.tensor(prompt_ids, device=self.device)
            budget -= len(prompt_ids)
        if options.condition_on_previous_text:
            budget -= MAX_TARGET_TOKENS // 2
        kwargs["max_new_tokens"] = max(1, min(options.max_new_tokens, budget - 1))
        if self.multilingual:
            kwargs.update(language=languages, task=options.task)
        return kwargs

    @torch.inference_mode()
    def decode_batch(self, audios: list[np.ndarray], languages: list[str | None] | None = None,
                     options: DecodeOptions = GREEDY) -> list[Decoded]:
        """Decode clips of at most 30 s in one batched generate() call; silent clips give empty text."""
        languages = languages or [None] * len(audios)
        silent = [is_silent(a) for a in audios]
        if any(silent):
            voiced = [i for i, s in enumerate(silent) if not s]
            decoded = self.decode_batch([audios[i] for i in voiced], [languages[i] for i in voiced], options) if voiced else []
            by_index = dict(zip(voiced, decoded))
            return [by_index.get(i, Decoded("", [], languages[i], None)) for i in range(len(audios))]
        features = self.features(audios)
        resolved = self._language_for(features, languages)
        ids = self.model.generate(input_features=features,
                                  **self._generate_kwargs(options, [lang for lang, _ in resolved]))
        eos = self.generation_config.eos_token_id
        decoded = []
        for row, (lang, prob) in zip(ids, resolved):
            tokens = [t for t in row.tolist() if t < eos]
            if options.initial_prompt:  # generate() returns the prompt too: keep what was decoded
                tokens = self._after_prompt(row.tolist())
            text = self.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()
            decoded.append(Decoded(text, tokens, lang, prob))
        return decoded

    def _after_prompt(self, ids: list[int]) -> list[int]:
        sot = self.generation_config.decoder_start_token_id
        ids = ids[ids.index(sot) + 1:] if sot in ids else ids
        return [t for t in ids if t < self.generation_config.eos_token_id]

    def transcribe(self, audio: np.ndarray | str | Path, language: str | None = None,
                   options: DecodeOptions = DecodeOptions(), vad: bool = False,
                   batch_size: int = 8) -> tuple[Iterator[Segment], TranscriptionInfo]:
        """Transcribe audio of any length, given as samples or as a path (then read block by block).

        Long audio uses openai/whisper's sequential algorithm with timestamps inside each block; with
        `vad`, only speech regions are decoded, in batches, and silence yields no segment at all.
        """
        source, duration = _open_source(audio)
        head = _read_block(source, 0.0, min(duration, CHUNK_SECONDS))
        if language is None and self.multilingual and not is_silent(head):
            (lang, prob), = self.detect_language(self.features([head]))
        else:
            lang, prob = (language, None) if self.multilingual else ("en", 1.0)
        info = TranscriptionInfo(lang, prob, duration)
        if vad:
            return self._vad_segments(source, duration, lang, options, batch_size), info
        if duration <= CHUNK_SECONDS:
            def short() -> Iterator[Segment]:
                (decoded,) = self.decode_batch([head], [lang], options)
                if decoded.text:
                    yield Segment(0, 0.0, round(duration, 3), decoded.text, decoded.tokens)
            return short(), info
        return transcribe_in_blocks(lambda block, offset: self._long_form(block, offset, lang, options),
                                    source, duration), info

    def _vad_segments(self, source, duration: float, language: str | None, options: DecodeOptions,
                      batch_size: int) -> Iterator[Segment]:
        from .vad import pack_regions, speech_regions

        def decode_block(block: np.ndarray, offset: float) -> list[Segment]:
            windows = pack_regions(speech_regions(block))
            clips = [np.concatenate([block[int(r.start * SAMPLE_RATE): int(r.end * SAMPLE_RATE)] for r in w])
                     for w in windows]
            out = []
            for first in range(0, len(clips), batch_size):
                batch = clips[first:first + batch_size]
                for i, d in enumerate(self.decode_batch(batch, [language] * len(batch), options), start=first):
                    if d.text:
                        out.append(Segment(i, round(offset + windows[i][0].start, 3),
                                           round(min(offset + windows[i][-1].end, duration), 3), d.text, d.tokens))
            return out

        return transcribe_in_blocks(decode_block, source, duration)

    @torch.inference_mode()
    def _long_form(self, audio: np.ndarray, offset: float, language: str | None,
                   options: DecodeOptions) -> list[Segment]:
        if is_silent(audio):
            return []
        inputs = self.processor.feature_extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt",
                                                  truncation=False, padding="longest", return_attention_mask=True)
        kwargs = self._generate_kwargs(options, language)
        out = self.model.generate(input_features=inputs.input_features.to(self.device, self.dtype),
                                  attention_mask=inputs.attention_mask.to(self.device), return_timestamps=True,
                                  return_segments=True, **kwargs)
        eos = self.generation_config.eos_token_id
        block_end = offset + len(audio) / SAMPLE_RATE
        segments = []
        for seg in out["segments"][0]:
            tokens = [t for t in seg["tokens"].tolist() if t < eos]
            text = self.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()
            if text:
                segments.append(Segment(len(segments), round(offset + float(seg["start"]), 3),
                                        round(min(offset + float(seg["end"]), block_end), 3), text, tokens))
        return segments


class CT2Transcriber:
    """The same interface on CTranslate2 through faster-whisper (its front end, its decoding loop).

    Models come from `whisper-lora export --format ct2`, any faster-whisper folder, or the embedded
    default (already CTranslate2).
    """

    def __init__(self, model_dir: str, compute_type: str = "default", device: str = "auto"):
        try:
            from faster_whisper import WhisperModel
        except ImportError:
            from .errors import UserError

            raise UserError("--backend ct2 needs faster-whisper: pip install 'whisper-lora[ct2]'") from None
        try:
            self.model = WhisperModel(model_dir, device=device, compute_type=compute_type)
        except ValueError as exc:  # e.g. float16 on a CPU
            from .errors import UserError

            raise UserError(f"cannot load with --compute-type {compute_type}: {exc}", model_dir) from None
        self.multilingual = self.model.model.is_multilingual
        self.languages = set(self.model.supported_languages)

    def _kwargs(self, options: DecodeOptions) -> dict:
        return dict(task=options.task, beam_size=options.num_beams, best_of=max(1, options.num_beams),
                    temperature=list(options.temperature),
                    compression_ratio_threshold=options.compression_ratio_threshold,
                    log_prob_threshold=options.log_prob_threshold, no_speech_threshold=options.no_speech_threshold,
                    initial_prompt=options.initial_prompt, condition_on_previous_text=options.condition_on_previous_text,
                    word_timestamps=options.word_timestamps, max_new_tokens=options.max_new_tokens)

    def _convert(self, segments, offset: float = 0.0) -> list[Segment]:
        out = []
        for s in segments:
            if not s.text.strip():
                continue
            words = [Word(round(offset + w.start, 3), round(offset + w.end, 3), w.word, w.probability)
                     for w in s.words] if s.words else None
            out.append(Segment(len(out), round(offset + s.start, 3), round(offset + s.end, 3), s.text.strip(),
                               list(s.tokens), s.avg_logprob, s.no_speech_prob, words))
        return out

    def decode_batch(self, audios: list[np.ndarray], languages: list[str | None] | None = None,
                     options: DecodeOptions = GREEDY) -> list[Decoded]:
        results = []
        for audio, language in zip(audios, languages or [None] * len(audios)):
            if is_silent(audio):
                results.append(Decoded("", [], language, None))
                continue
            segments, info = self.model.transcribe(audio, language=language, without_timestamps=True,
                                                   **self._kwargs(options))
            segments = list(segments)
            results.append(Decoded("".join(s.text for s in segments).strip(), [t for s in segments for t in s.tokens],
                                   info.language, info.language_probability))
        return results

    def transcribe(self, audio: np.ndarray | str | Path, language: str | None = None,
                   options: DecodeOptions = DecodeOptions(), vad: bool = False,
                   batch_size: int = 8) -> tuple[Iterator[Segment], TranscriptionInfo]:
        source, duration = _open_source(audio)
        if language is None and self.multilingual:
            language, prob, _ = self.model.detect_language(_read_block(source, 0.0, min(duration, CHUNK_SECONDS)))
        else:
            prob = None if self.multilingual else 1.0
        info = TranscriptionInfo(language if self.multilingual else "en", prob, duration)

        def decode_block(block: np.ndarray, offset: float) -> list[Segment]:
            if is_silent(block):
                return []
            segments, _ = self.model.transcribe(block, language=info.language, vad_filter=vad, **self._kwargs(options))
            return self._convert(segments, offset)

        return transcribe_in_blocks(decode_block, source, duration), info
