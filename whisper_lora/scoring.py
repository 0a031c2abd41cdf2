"""CER/WER of a model on a manifest's clips: what `evaluate`, training's dev evaluation, `export`'s
parity gate and the demo all report, computed one way."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .audio import load_window
from .decode import GREEDY, Backend, DecodeOptions, join_text
from .errors import AudioError
from .manifest import Sample
from .text import error_rate


@dataclass
class ModelScore:
    model: str
    cer: float
    wer: float
    rows: list[dict] = field(default_factory=list)

    def subset(self, audio_paths: set[str]) -> "ModelScore":
        rows = [r for r in self.rows if r["audio"] in audio_paths]
        return score_rows(self.model, rows)


def score_rows(model: str, rows: list[dict]) -> ModelScore:
    refs, hyps, langs = [r["reference"] for r in rows], [r["hypothesis"] for r in rows], [r["language"] for r in rows]
    return ModelScore(model, error_rate(refs, hyps, "cer", langs), error_rate(refs, hyps, "wer", langs), rows)


def load_clips(samples: list[Sample]) -> tuple[list[tuple[Sample, np.ndarray]], list[str]]:
    """Decode every clip once (shared by all models); unreadable clips are reported, not scored."""
    clips, problems = [], []
    for sample in samples:
        try:
            audio = load_window(sample.audio_path, sample.start, sample.end)  # a cut clip would skew the score
        except AudioError as exc:
            problems.append(str(exc))
            continue
        clips.append((sample, audio))
    return clips, problems


def score_model(name: str, backend: Backend, clips: list[tuple[Sample, np.ndarray]], default_language: str | None,
                options: DecodeOptions = GREEDY, batch_size: int = 16, progress: bool = True) -> ModelScore:
    from tqdm.auto import tqdm

    rows = []
    for start in tqdm(range(0, len(clips), batch_size), desc=f"evaluate {name}", disable=not progress, leave=False):
        batch = clips[start: start + batch_size]
        languages = [s.language or default_language for s, _ in batch]
        decoded = backend.transcribe_batch([a for _, a in batch], languages, options)
        rows += [{"audio": str(s.audio_path), "reference": s.text, "hypothesis": join_text(segments, info.language),
                  "language": lang or info.language}
                 for (s, _), (segments, info), lang in zip(batch, decoded, languages)]
    return score_rows(name, rows)
