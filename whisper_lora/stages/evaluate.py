"""`whisper-lora evaluate`: several models on one manifest, one table, every hypothesis in JSON."""
from __future__ import annotations

import dataclasses
import gc
import json
from dataclasses import replace
from pathlib import Path

from ..audio_ctx import parse_audio_ctx
from ..config import EvaluateConfig
from ..decode import GREEDY, TransformersBackend
from ..errors import UserError
from ..devices import torch_placement
from ..manifest import check_audio_exists, language_code, read_manifest
from ..models import load_model, recorded_audio_ctx, resolve_model
from ..report import format_table
from ..scoring import ModelScore, load_clips, score_model
from ..text import default_metric


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
    device, dtype = torch_placement(config.device, config.dtype)
    scores = []
    for spec in config.models:
        resolved = resolve_model(spec)
        model, processor = load_model(resolved, device=device, dtype=dtype)
        backend = TransformersBackend(model, processor, device=device)
        backend.model_audio_ctx = recorded_audio_ctx(resolved.adapter or resolved.location)  # as transcribe reads it
        options = replace(GREEDY, task=config.task, num_beams=config.num_beams, max_new_tokens=config.max_new_tokens,
                          audio_ctx=parse_audio_ctx(config.audio_ctx))
        scores.append(score_model(spec, backend, clips, language, options, config.batch_size))
        del model, backend
        gc.collect()

    # ---- save
    print(format_table(["model", "CER", "WER", "clips"],
                       [[s.model, s.cer, s.wer, len(s.rows)] for s in scores]))
    print(f"(headline metric: {metric.upper()}; text normalised: case, punctuation, width, "
          f"traditional->simplified Chinese; {len(problems)} clips skipped)")
    if config.card:  # the scores into the model card of each folder whisper-lora wrote
        from ..model_card import Score, add_scores

        for spec, score in zip(config.models, scores):
            if Path(spec).is_dir():
                measured = [Score.of(m, getattr(score, m), config.manifest, clips=len(score.rows)) for m in ("cer", "wer")]
                if (card := add_scores(Path(spec), measured)) is not None:
                    print(f"scores added to {card}")
    if config.output:
        Path(config.output).parent.mkdir(parents=True, exist_ok=True)
        Path(config.output).write_text(json.dumps({
            "manifest": str(config.manifest), "metric": metric, "skipped": problems, "config": dataclasses.asdict(config),
            "models": [{"model": s.model, "cer": s.cer, "wer": s.wer, "samples": s.rows} for s in scores],
        }, indent=2, ensure_ascii=False))
    return scores
