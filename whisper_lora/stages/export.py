"""`whisper-lora export --format ct2`: a faster-whisper model, with a parity gate.

Users' top complaint about deploying fine-tuned Whisper is accuracy silently lost in the conversion
(quantisation, and a different audio front end: faster-whisper pads the spectrogram, transformers
pads the waveform). So the export is scored the way users will run it — through faster-whisper's own
transcribe() — beside the transformers model on a dev manifest, and it fails loudly when the gap is
larger than --max-gap points.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
import tempfile
from pathlib import Path

from ..config import ExportConfig
from ..rundir import clear_output_dir, save_config
from ..errors import UserError
from ..constants import MAX_NEW_TOKENS
from ..decode import GREEDY, CT2Backend, TransformersBackend
from ..lora import merge_into_base
from ..manifest import check_audio_exists, language_code, read_manifest
from ..models import load_model, save_processor
from ..report import format_table
from ..text import default_metric
from ..scoring import load_clips, score_model

EXPORT_REPORT = "export_report.json"
EXPORT_CONFIG = "export_config.yaml"
COPIED_FILES = ["tokenizer.json", "preprocessor_config.json"]  # faster-whisper reads both


def _require_ct2():
    try:
        import ctranslate2  # noqa: F401
        import faster_whisper  # noqa: F401
    except ImportError:
        raise UserError("export --format ct2 needs CTranslate2: pip install 'whisper-lora[ct2]'") from None


def parity_verdict(reference, exported, metric: str, max_gap: float) -> dict:
    """Compare two ModelScores on the same clips; gap in absolute percentage points."""
    gap = 100 * (getattr(exported, metric) - getattr(reference, metric))
    return {"metric": metric, "clips": len(reference.rows), f"transformers_{metric}": getattr(reference, metric),
            f"ct2_{metric}": getattr(exported, metric), "gap_points": round(gap, 3), "max_gap_points": max_gap,
            "passed": gap <= max_gap}


def run(config: ExportConfig) -> Path:
    # ---- set up
    _require_ct2()
    from ctranslate2.converters import TransformersConverter

    out = Path(config.output_dir)
    clear_output_dir(out, config.overwrite, "export target exists")
    language = language_code(config.language, "--language") if config.language else None
    clips = []
    if config.parity_check:
        samples = read_manifest(config.dev_manifest, config.audio_dir)
        check_audio_exists(samples, config.dev_manifest)
        clips, problems = load_clips(samples)
        for problem in problems:
            print(f"skipping {problem}")
        if not clips:
            raise UserError("no readable clips for the parity gate", config.dev_manifest)
    model, processor = load_model(config.model)
    if hasattr(model, "merge_and_unload"):
        model = merge_into_base(model)

    with tempfile.TemporaryDirectory(prefix="whisper-lora-export-") as staging:
        # ---- convert: a merged transformers folder -> CTranslate2 via its stock converter
        merged_dir = Path(staging) / "merged"
        model.save_pretrained(merged_dir)
        save_processor(processor, merged_dir)
        # Converted beside the target and renamed only once it passed: a crash leaves nothing that looks final.
        partial = out.with_name(out.name + ".partial")
        TransformersConverter(str(merged_dir), copy_files=COPIED_FILES, load_as_float16=False).convert(
            str(partial), quantization=config.quantization, force=True)

    # ---- parity gate
    report = {"model": config.model, "format": config.format, "quantization": config.quantization}
    if config.parity_check:
        metric = config.metric if config.metric != "auto" else default_metric(
            language or next((s.language for s, _ in clips if s.language), None))
        # Same greedy settings for both; the export runs through faster-whisper's own front end and
        # loop (CT2Backend), which is what users will deploy.
        options = replace(GREEDY, max_new_tokens=MAX_NEW_TOKENS)
        reference = score_model("transformers", TransformersBackend(model, processor), clips, language, options)
        exported = score_model("ct2", CT2Backend(str(partial)), clips, language, options)
        verdict = parity_verdict(reference, exported, metric, config.max_gap)
        report.update(verdict)
        gap = verdict["gap_points"]
        print(format_table(["model", metric.upper(), "clips"],
                           [["transformers (fp32)", getattr(reference, metric), len(clips)],
                            [f"ctranslate2 ({config.quantization}, faster-whisper)", getattr(exported, metric), len(clips)]]))
        print(f"gap: {gap:+.2f} points (limit {config.max_gap:.2f})")
        if not verdict["passed"]:
            failed = out.with_name(out.name + ".parity-failed")
            shutil.rmtree(failed, ignore_errors=True)
            partial.rename(failed)
            (failed / EXPORT_REPORT).write_text(json.dumps(report, indent=2))
            raise UserError(f"parity gate failed: the export's {metric.upper()} is {gap:.2f} points worse than "
                            f"the transformers model (limit {config.max_gap}); kept for inspection in {failed}",
                            out)

    # ---- save
    (partial / EXPORT_REPORT).write_text(json.dumps(report, indent=2))
    save_config(config, partial / EXPORT_CONFIG)
    partial.rename(out)
    print(f"exported to {out} (load with faster_whisper.WhisperModel({str(out)!r}))")
    return out
