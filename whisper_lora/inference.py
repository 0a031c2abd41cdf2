"""The one inference core: audio in, typed `Segment`s out.

`Transcriber.transcribe()` returns `(segments, info)` where `segments` is a lazy iterator, as in
faster-whisper; the CLI consumes it today and the server, web UI and realtime front ends will consume
the same shape. `decode_batch()` is the batched short-clip path used by evaluation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from .audio import CHUNK_SECONDS, SAMPLE_RATE
from .data import log_mel


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


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class Transcriber:
    """Wraps a (possibly LoRA-adapted) transformers Whisper model for decoding."""

    def __init__(self, model, processor, device: str | None = None):
        self.device = device or default_device()
        self.model = model.to(self.device).eval()
        self.processor = processor
        self.generation_config = self._base_model().generation_config
        self.multilingual = bool(getattr(self.generation_config, "is_multilingual", False))
        lang_to_id = getattr(self.generation_config, "lang_to_id", None) or {}
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

    @torch.inference_mode()
    def decode_batch(self, audios: list[np.ndarray], languages: list[str | None] | None = None,
                     task: str = "transcribe", num_beams: int = 1, max_new_tokens: int = 128) -> list[Decoded]:
        """Decode clips of at most 30 s in one batched generate() call."""
        features = self.features(audios)
        resolved = self._language_for(features, languages or [None] * len(audios))
        kwargs = {}
        if self.multilingual:
            kwargs = {"language": [lang for lang, _ in resolved], "task": task}
        ids = self.model.generate(input_features=features, num_beams=num_beams, do_sample=False,
                                  max_new_tokens=max_new_tokens, **kwargs)
        texts = self.processor.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return [Decoded(text.strip(), [t for t in row.tolist() if t < self.generation_config.eos_token_id],
                        lang, prob) for text, row, (lang, prob) in zip(texts, ids, resolved)]

    def transcribe(self, audio: np.ndarray, language: str | None = None, task: str = "transcribe",
                   num_beams: int = 1, max_new_tokens: int = 440, vad: bool = False,
                   batch_size: int = 8) -> tuple[Iterator[Segment], TranscriptionInfo]:
        """Transcribe audio of any length. Long audio is decoded window by window with timestamps
        (openai/whisper's sequential long-form algorithm), so nothing past 30 s is dropped; with
        `vad`, only speech regions are decoded, in batches, and silence yields no segment at all."""
        duration = len(audio) / SAMPLE_RATE
        if vad:
            return self._vad_segments(audio, language, task, num_beams, max_new_tokens, batch_size, duration)
        first_window = self.features([audio[: CHUNK_SECONDS * SAMPLE_RATE]])
        (lang, prob), = self._language_for(first_window, [language])
        info = TranscriptionInfo(lang, prob, duration)
        if duration <= CHUNK_SECONDS:
            def short() -> Iterator[Segment]:
                (decoded,) = self.decode_batch([audio], [lang], task, num_beams, max_new_tokens)
                if decoded.text:
                    yield Segment(0, 0.0, round(duration, 3), decoded.text, decoded.tokens)
            return short(), info
        return self._long_form(audio, lang, task, num_beams, duration), info

    def _vad_segments(self, audio: np.ndarray, language: str | None, task: str, num_beams: int,
                      max_new_tokens: int, batch_size: int, duration: float):
        from .vad import pack_regions, speech_regions

        windows = pack_regions(speech_regions(audio))
        clips = [np.concatenate([audio[int(r.start * SAMPLE_RATE): int(r.end * SAMPLE_RATE)] for r in w]) for w in windows]
        if language is None and clips and self.multilingual:
            (language, prob), = self.detect_language(self.features(clips[:1]))
        else:
            prob = None if language or not self.multilingual else 1.0
        info = TranscriptionInfo(language if self.multilingual else "en", prob, duration)

        def segments() -> Iterator[Segment]:
            for first in range(0, len(clips), batch_size):
                decoded = self.decode_batch(clips[first:first + batch_size], [language] * len(clips[first:first + batch_size]),
                                            task, num_beams, max_new_tokens)
                for i, d in enumerate(decoded, start=first):
                    if d.text:
                        yield Segment(i, round(windows[i][0].start, 3), round(min(windows[i][-1].end, duration), 3),
                                      d.text, d.tokens)
        return segments(), info

    @torch.inference_mode()
    def _long_form(self, audio: np.ndarray, language: str | None, task: str, num_beams: int,
                   duration: float) -> Iterator[Segment]:
        inputs = self.processor.feature_extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt",
                                                  truncation=False, padding="longest", return_attention_mask=True)
        kwargs = {"language": language, "task": task} if self.multilingual else {}
        out = self.model.generate(input_features=inputs.input_features.to(self.device, self.dtype),
                                  attention_mask=inputs.attention_mask.to(self.device), return_timestamps=True,
                                  return_segments=True, num_beams=num_beams, do_sample=False,
                                  condition_on_prev_tokens=False, **kwargs)
        eos = self.generation_config.eos_token_id
        for i, seg in enumerate(out["segments"][0]):
            tokens = [t for t in seg["tokens"].tolist() if t < eos]
            text = self.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()
            if text:
                yield Segment(i, round(float(seg["start"]), 3), round(min(float(seg["end"]), duration), 3), text, tokens)


COMPUTE_TYPES = ("default", "int8", "int8_float16", "int8_float32", "float16", "bfloat16", "float32")


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
        self.model = WhisperModel(model_dir, device=device, compute_type=compute_type)
        self.multilingual = self.model.model.is_multilingual
        self.languages = set(self.model.supported_languages)

    def decode_batch(self, audios: list[np.ndarray], languages: list[str | None] | None = None,
                     task: str = "transcribe", num_beams: int = 1, max_new_tokens: int = 128) -> list[Decoded]:
        results = []
        for audio, language in zip(audios, languages or [None] * len(audios)):
            segments, info = self.model.transcribe(audio, language=language, task=task, beam_size=num_beams,
                                                   best_of=1, temperature=0.0, without_timestamps=True,
                                                   condition_on_previous_text=False, max_new_tokens=max_new_tokens)
            segments = list(segments)
            text = "".join(s.text for s in segments).strip()
            results.append(Decoded(text, [t for s in segments for t in s.tokens], info.language,
                                   info.language_probability))
        return results

    def transcribe(self, audio: np.ndarray, language: str | None = None, task: str = "transcribe",
                   num_beams: int = 1, max_new_tokens: int = 440, vad: bool = False,
                   batch_size: int = 8) -> tuple[Iterator[Segment], TranscriptionInfo]:
        segments, info = self.model.transcribe(audio, language=language, task=task, beam_size=num_beams,
                                               condition_on_previous_text=False, vad_filter=vad)
        converted = (Segment(s.id, round(s.start, 3), round(s.end, 3), s.text.strip(), list(s.tokens),
                             s.avg_logprob, s.no_speech_prob) for s in segments if s.text.strip())
        return converted, TranscriptionInfo(info.language, info.language_probability, info.duration)
