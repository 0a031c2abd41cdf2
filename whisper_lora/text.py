"""Text normalisation and error rates that are comparable across runs and languages.

CER/WER numbers are only meaningful with the normaliser stated, so there is exactly one here:
Unicode NFKC, traditional -> simplified Chinese, lower case, punctuation (ASCII and CJK) removed,
whitespace collapsed. Languages written without spaces are scored on characters with spaces removed.
English additionally goes through Whisper's own English normaliser (numbers "seven" == "7",
contractions, titles), as in the Whisper paper, so a model is not penalised for writing digits.
"""
from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass
from typing import Iterable

import jiwer

from .constants import NO_SPACE_LANGUAGES

# Scripts written without spaces between words: WER is meaningless, CER ignores spaces.
CHINESE_LANGUAGES = frozenset({"zh", "yue"})
_KANA = re.compile(r"[\u3040-\u30ff]")
_HAN = re.compile(r"[\u4e00-\u9fff]")
_WHITESPACE = re.compile(r"\s+")


@functools.lru_cache(maxsize=1)
def _english_normalizer():
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    return EnglishTextNormalizer({})  # no British->American spelling map: it ships with hub models only


@functools.lru_cache(maxsize=1)
def _to_simplified():
    import opencc

    return opencc.OpenCC("t2s").convert


def _is_punctuation(char: str) -> bool:
    return unicodedata.category(char).startswith("P")


def normalize(text: str, language: str | None = None) -> str:
    """The normaliser every metric in whisper-lora uses."""
    text = unicodedata.normalize("NFKC", text)
    if language == "en":
        text = _english_normalizer()(text)
    chinese = language in CHINESE_LANGUAGES or (language is None and _HAN.search(text) and not _KANA.search(text))
    if chinese:
        text = _to_simplified()(text)
    text = "".join(" " if _is_punctuation(c) else c for c in text.lower())
    text = _WHITESPACE.sub(" ", text).strip()
    if language in NO_SPACE_LANGUAGES or (language is None and chinese):
        text = text.replace(" ", "")
    return text


def default_metric(language: str | None) -> str:
    return "cer" if language in NO_SPACE_LANGUAGES else "wer"


@dataclass
class ErrorCounts:
    errors: int = 0
    reference_length: int = 0

    def __add__(self, other: "ErrorCounts") -> "ErrorCounts":
        return ErrorCounts(self.errors + other.errors, self.reference_length + other.reference_length)

    @property
    def rate(self) -> float:
        """Corpus-level error rate (total edits / total reference units), as a fraction."""
        if self.reference_length == 0:
            return 0.0 if self.errors == 0 else 1.0
        return self.errors / self.reference_length


def error_counts(reference: str, hypothesis: str, metric: str) -> ErrorCounts:
    """Edit counts on already-normalised text; `metric` is "cer" or "wer"."""
    if metric == "cer":
        ref_units, hyp_units = reference, hypothesis
        process = jiwer.process_characters
    elif metric == "wer":
        ref_units, hyp_units = reference.split(), hypothesis.split()
        process = jiwer.process_words
    else:
        raise ValueError(f"unknown metric {metric!r}; use 'cer' or 'wer'")
    if not ref_units:
        return ErrorCounts(len(hyp_units), 0)
    if not hyp_units:
        return ErrorCounts(len(ref_units), len(ref_units))
    out = process(reference, hypothesis)
    return ErrorCounts(out.substitutions + out.deletions + out.insertions, len(ref_units))


def error_rate(references: Iterable[str], hypotheses: Iterable[str], metric: str,
               languages: Iterable[str | None] | None = None) -> float:
    """Corpus-level CER or WER after `normalize`, each pair normalised for its own language."""
    references, hypotheses = list(references), list(hypotheses)
    languages = list(languages) if languages is not None else [None] * len(references)
    total = ErrorCounts()
    for ref, hyp, lang in zip(references, hypotheses, languages, strict=True):
        total += error_counts(normalize(ref, lang), normalize(hyp, lang), metric)
    return total.rate
