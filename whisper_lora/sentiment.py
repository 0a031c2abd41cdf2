"""Sentiment of transcripts: positive, negative or neutral, with a score, per segment and for the whole text.

The default works offline, with no download, from small models that ship inside PyPI packages, chosen
by the transcript's language:
  en        VADER (vaderSentiment: lexicon + rules made for short informal text); compound score
  zh, yue   SnowNLP (naive Bayes trained on product reviews); the probability of positive
Any Hugging Face text-classification model (hub id or folder, `--sentiment-model`) replaces them for
every language, through `transformers.pipeline`. A language without an analyser gets no label and a
note saying so: never a made-up one.
"""
from __future__ import annotations

import functools
import re
import threading
from dataclasses import replace

from .decode.types import Segment, Sentiment
from .errors import UserError

LABELS = ("positive", "negative", "neutral")
SENTIMENT_PIP = "pip install 'whisper-lora[sentiment]'"
VADER_NEUTRAL = 0.05  # |compound| below this is neutral (VADER's authors' threshold)
SNOWNLP_NEUTRAL = (0.4, 0.6)  # P(positive) between these is neutral


class Analyser:
    """Scores texts of one language (or any, for a Hugging Face model)."""
    name: str

    def __call__(self, texts: list[str]) -> list[Sentiment]:
        raise NotImplementedError


class Vader(Analyser):
    name = "vaderSentiment (English)"

    def __init__(self):
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:
            raise UserError(f"English sentiment needs vaderSentiment: {SENTIMENT_PIP}") from None
        self.analyser = SentimentIntensityAnalyzer()

    def __call__(self, texts: list[str]) -> list[Sentiment]:
        out = []
        for text in texts:
            compound = self.analyser.polarity_scores(text)["compound"]
            label = "neutral" if abs(compound) < VADER_NEUTRAL else "positive" if compound > 0 else "negative"
            score = 1.0 - abs(compound) if label == "neutral" else abs(compound)
            out.append(Sentiment(label, round(score, 4)))
        return out


class SnowNLP(Analyser):
    name = "SnowNLP (Chinese)"

    def __init__(self):
        try:
            from snownlp import SnowNLP as model
        except ImportError:
            raise UserError(f"Chinese sentiment needs snownlp: {SENTIMENT_PIP}") from None
        self.model = model

    def __call__(self, texts: list[str]) -> list[Sentiment]:
        out = []
        for text in texts:
            positive = float(self.model(text).sentiments) if text.strip() else 0.5
            low, high = SNOWNLP_NEUTRAL
            label = "positive" if positive >= high else "negative" if positive <= low else "neutral"
            score = positive if label == "positive" else 1 - positive if label == "negative" else \
                1 - abs(positive - 0.5) * 2
            out.append(Sentiment(label, round(score, 4)))
        return out


def label_of(name: str, index: int, count: int) -> str | None:
    """A classifier's label in our three: by its name (POSITIVE, neg, Neutral, 4 stars), or for LABEL_n by the
    usual conventions (two labels: 0 negative, 1 positive, as SST-2; three: negative, neutral, positive)."""
    lowered = name.lower()
    for label, stem in (("positive", "pos"), ("negative", "neg"), ("neutral", "neu")):
        if stem in lowered:
            return label
    stars = re.match(r"^\s*(\d)\s*star", lowered)
    if stars:
        value = int(stars.group(1))
        return "negative" if value <= 2 else "neutral" if value == 3 else "positive"
    if re.fullmatch(r"label_\d+", lowered):
        order = {2: ("negative", "positive"), 3: ("negative", "neutral", "positive")}.get(count)
        return order[index] if order and index < count else None
    return None


class HuggingFace(Analyser):
    """Any text-classification model through `transformers.pipeline` (local folder or hub id)."""

    def __init__(self, model: str):
        from transformers import pipeline

        self.name = model
        try:
            self.pipe = pipeline("text-classification", model=model, top_k=None, device="cpu")
        except (OSError, ValueError) as exc:
            reason = str(exc).strip().splitlines()[0][:200]
            raise UserError(f"cannot load the sentiment model ({reason}); for a hub id this machine needs a network "
                            "or the model in the Hugging Face cache", model) from None
        id2label = self.pipe.model.config.id2label
        self.labels = {name: label_of(name, index, len(id2label)) for index, name in id2label.items()}
        unknown = [name for name, label in self.labels.items() if label is None]
        if unknown:
            raise UserError(f"cannot tell which of its labels ({', '.join(map(str, id2label.values()))}) mean "
                            "positive, negative and neutral", model)
        self.lock = threading.Lock()  # a transformers pipeline is not meant to be called from several threads

    def __call__(self, texts: list[str]) -> list[Sentiment]:
        with self.lock:
            results = self.pipe([t or " " for t in texts], truncation=True)
        out = []
        for scores in results:
            totals = {label: 0.0 for label in LABELS}
            for item in scores:  # labels mapping to the same class (e.g. 4 and 5 stars) add up
                totals[self.labels[item["label"]]] += item["score"]
            label = max(totals, key=totals.get)
            out.append(Sentiment(label, round(totals[label], 4)))
        return out


DEFAULTS = {"en": Vader, "zh": SnowNLP, "yue": SnowNLP}


@functools.lru_cache(maxsize=None)
def _default(language: str) -> Analyser:
    return DEFAULTS[language]()


@functools.lru_cache(maxsize=4)
def _huggingface(model: str) -> HuggingFace:
    return HuggingFace(model)


def analyser_for(language: str | None, model: str | None = None) -> Analyser | None:
    """The analyser for a transcript in `language`: `model` if given, else the default for the language
    (None when there is none)."""
    if model:
        return _huggingface(model)
    return _default(language) if language in DEFAULTS else None


def no_analyser_note(language: str | None) -> str:
    return (f"no sentiment analyser for language '{language}' (offline defaults: "
            f"{', '.join(sorted(DEFAULTS))}); pass a Hugging Face text-classification model with --sentiment-model")


def annotate(segments: list[Segment], text: str, language: str | None,
             model: str | None = None) -> tuple[list[Segment], Sentiment | None, str | None]:
    """Segments with their sentiment, the whole text's sentiment, and a note when the language has no
    analyser (then no label is given at all)."""
    analyser = analyser_for(language, model)
    if analyser is None:
        return segments, None, no_analyser_note(language)
    scored = analyser([s.text for s in segments] + [text])
    return [replace(s, sentiment=r) for s, r in zip(segments, scored)], scored[-1], None
