"""`whisper-lora evaluate`: several models on one manifest, one table, every hypothesis in JSON."""
from __future__ import annotations

import gc
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..audio import load_window
from ..config import EvaluateConfig
from ..errors import AudioError, UserError
from ..inference import GREEDY, DecodeOptions, Transcriber
from ..manifest import Sample, check_audio_exists, language_code, read_manifest
from ..models import load_model
from ..report import format_table
from ..text import default_metric, error_rate


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


def score_model(name: str, transcriber: Transcriber, clips: list[tuple[Sample, np.ndarray]],
                default_language: str | None, options: DecodeOptions = GREEDY, batch_size: int = 16,
                progress: bool = True) -> ModelScore:
    from tqdm.auto import tqdm

    rows = []
    for start in tqdm(range(0, len(clips), batch_size), desc=f"evaluate {name}", disable=not progress, leave=False):
        batch = clips[start : start + batch_size]
        languages = [s.language or default_language for s, _ in batch]
        decoded = transcriber.decode_batch([a for _, a in batch], languages, options)
        rows += [{"audio": str(s.audio_path), "reference": s.text, "hypothesis": d.text,
                  "language": lang or d.language} for (s, _), d, lang in zip(batch, decoded, languages)]
    return score_rows(name, rows)


def run(config: EvaluateConfig) -> list[ModelScore]:
    # ---- set up
    if config.output and Path(config.output).is_dir():
        raise UserError("--output is a folder; give a JSON file name", config.output)
    language = language_code(config.language, "--language") if config.language else None
    samples = read_manifest(config.manifest, config.audio_dir)
    check_audio_exists(samples, config.manifest)
    clips, problems = load_clips(samples)
    for problem in problems:
        print(f"skipping {problem}")
    metric = config.metric if config.metric != "auto" else default_metric(
        language or next((s.language for s in samples if s.language), None))

    # ---- loop: one model at a time, so only one is in memory
    scores = []
    for spec in config.models:
        model, processor = load_model(spec)
        transcriber = Transcriber(model, processor)
        options = replace(GREEDY, task=config.task, num_beams=config.num_beams, max_new_tokens=config.max_new_tokens)
        scores.append(score_model(spec, transcriber, clips, language, options, config.batch_size))
        del model, transcriber
        gc.collect()

    # ---- save
    print(format_table(["model", "CER", "WER", "clips"],
                       [[s.model, s.cer, s.wer, len(s.rows)] for s in scores]))
    print(f"(headline metric: {metric.upper()}; text normalised: case, punctuation, width, "
          f"traditional->simplified Chinese; {len(problems)} clips skipped)")
    if config.output:
        Path(config.output).parent.mkdir(parents=True, exist_ok=True)
        Path(config.output).write_text(json.dumps({
            "manifest": str(config.manifest), "metric": metric, "skipped": problems,
            "models": [{"model": s.model, "cer": s.cer, "wer": s.wer, "samples": s.rows} for s in scores],
        }, indent=2, ensure_ascii=False))
    return scores
