"""`whisper-lora export --format ct2|ggml|openai`: the model for another runtime, with a parity gate.

* ct2: a faster-whisper folder (CTranslate2's own converter);
* ggml: a whisper.cpp model file (written by `ggml.write_ggml`);
* openai: an openai-whisper checkpoint, `whisper.load_model(path)` (`openai_checkpoint.write_openai`).

Users' top complaint about deploying fine-tuned Whisper is accuracy silently lost in the conversion
(quantisation, a different audio front end, a tokenizer that does not match). So the export is scored
the way users will run it — through that runtime's own transcribe (faster-whisper, whisper.cpp through
pywhispercpp, openai-whisper) — beside the transformers model on a dev manifest, and it fails loudly when
its CER/WER is worse by more than --max-gap points or fewer than --min-identical of the clips read the same.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Callable

from ..config import ExportConfig
from ..rundir import clear_output_dir, save_config
from ..errors import UserError
from ..constants import MAX_NEW_TOKENS
from ..decode import GREEDY, CT2Backend, TransformersBackend
from ..lora import merge_into_base
from ..manifest import check_audio_exists, language_code, read_manifest
from ..model_card import CardInfo, Score, inherited, write_card
from ..models import load_model, public_name, resolve_model, save_processor
from ..report import format_table
from ..text import default_metric
from ..scoring import load_clips, score_model

EXPORT_REPORT = "export_report.json"
EXPORT_CONFIG = "export_config.yaml"
COPIED_FILES = ["tokenizer.json", "preprocessor_config.json"]  # faster-whisper reads both


RUNTIMES = {"ct2": "faster-whisper", "ggml": "whisper.cpp", "openai": "openai-whisper"}
INSTALL = {"ct2": "pip install 'whisper-lora[ct2]'", "ggml": "pip install 'whisper-lora[ggml]'",
           "openai": "pip install 'whisper-lora[openai-whisper]'"}


def _require(fmt: str, parity_check: bool) -> None:
    """The packages an export needs: CTranslate2 to convert; whisper.cpp or openai-whisper to run the gate."""
    modules = {"ct2": ["ctranslate2", "faster_whisper"], "ggml": ["pywhispercpp"] if parity_check else [],
               "openai": ["whisper", "torch"] if parity_check else []}[fmt]
    why = "its converter" if fmt == "ct2" else "the parity gate runs the export through " + RUNTIMES[fmt]
    for module in modules:
        try:
            __import__(module)
        except ImportError:
            raise UserError(f"export --format {fmt} needs {module} ({why}): {INSTALL[fmt]}") from None


def same_text(a: str, b: str) -> bool:
    return " ".join(a.split()) == " ".join(b.split())


def parity_verdict(reference, exported, metric: str, max_gap: float, min_identical: float = 0.0,
                   runtime: str = "ct2") -> dict:
    """Compare two ModelScores on the same clips: the gap in absolute percentage points, and the share of
    clips whose texts are identical (up to spacing)."""
    gap = 100 * (getattr(exported, metric) - getattr(reference, metric))
    differing = [{"audio": r["audio"], "transformers": r["hypothesis"], runtime: e["hypothesis"]}
                 for r, e in zip(reference.rows, exported.rows) if not same_text(r["hypothesis"], e["hypothesis"])]
    clips = len(reference.rows)
    identical = clips - len(differing)
    return {"metric": metric, "clips": clips, f"transformers_{metric}": getattr(reference, metric),
            f"{runtime}_{metric}": getattr(exported, metric), "gap_points": round(gap, 3), "max_gap_points": max_gap,
            "identical_texts": identical, "min_identical": min_identical, "differing": differing,
            "passed": gap <= max_gap and identical >= min_identical * clips}


def convert(fmt: str, model, processor, partial: Path, precision: str) -> tuple[Path, Callable]:
    """Write the export into the folder `partial`; returns what users load and how the gate runs it."""
    with tempfile.TemporaryDirectory(prefix="whisper-lora-export-") as staging:
        merged_dir = Path(staging) / "merged"
        model.save_pretrained(merged_dir)
        save_processor(processor, merged_dir)
        if fmt == "ct2":
            from ctranslate2.converters import TransformersConverter

            TransformersConverter(str(merged_dir), copy_files=COPIED_FILES, load_as_float16=False).convert(
                str(partial), quantization=precision, force=True)
            return partial, lambda: CT2Backend(str(partial))
        partial.mkdir(parents=True)
        for name in COPIED_FILES:  # the tokenizer and front end the model was trained with, beside it
            shutil.copy(merged_dir / name, partial / name)
        if fmt == "ggml":
            from ..ggml import WhisperCppRunner, mel_filters_of, tokenizer_json_of, write_ggml

            target = partial / ("ggml-model.bin" if precision == "float16" else "ggml-model-f32.bin")
            write_ggml(model, tokenizer_json_of(merged_dir), mel_filters_of(processor), target,
                       f16=precision == "float16")
            return target, lambda: WhisperCppRunner(target)
    from ..openai_checkpoint import OpenAIWhisperRunner, write_openai

    target = write_openai(model, partial / "model.pt", dtype=precision)
    return target, lambda: OpenAIWhisperRunner(target)


USAGE = {"ct2": "faster_whisper.WhisperModel({!r})", "ggml": "whisper-cli -m {!r}, or pywhispercpp.model.Model({!r})",
         "openai": "whisper.load_model({!r})"}


def export_card(config: ExportConfig, report: dict, target: Path) -> CardInfo:
    """The source's card (an adapter's or a merged folder's), as this format, with the gate's score."""
    resolved = resolve_model(config.model)
    source = resolved.adapter or (Path(resolved.location) if Path(config.model).is_dir() else None)
    base = config.model if resolved.adapter is None else json.loads(
        (resolved.adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    carried = inherited(source) if source is not None else {}
    if "metric" in report:
        metric = report["metric"]
        carried["scores"] = [*carried.get("scores", []), Score.of(
            metric, report[f"{config.format}_{metric}"], config.dev_manifest, runtime=RUNTIMES[config.format],
            clips=report["clips"], source="export")]
    carried.setdefault("base_model", public_name(base))  # a merged source's card knows its real base
    return CardInfo(kind=config.format, made_from=str(source or config.model), files=target.name, **carried)


def run(config: ExportConfig) -> Path:
    # ---- set up
    _require(config.format, config.parity_check)
    precision = config.precision
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

    # ---- convert; beside the target, renamed only once it passed: a crash leaves nothing that looks final
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    target, runner = convert(config.format, model, processor, partial, precision)

    # ---- parity gate
    report = {"model": config.model, "format": config.format, "precision": precision,
              "runtime": RUNTIMES[config.format], "file": target.name}
    if config.parity_check:
        metric = config.metric if config.metric != "auto" else default_metric(
            language or next((s.language for s, _ in clips if s.language), None))
        # Same greedy settings for both; the export runs through its runtime's own front end and loop
        # (faster-whisper, whisper.cpp, openai-whisper), which is what users will deploy.
        options = replace(GREEDY, max_new_tokens=MAX_NEW_TOKENS)
        reference = score_model("transformers", TransformersBackend(model, processor), clips, language, options)
        exported_backend = runner()
        exported = score_model(config.format, exported_backend, clips, language, options)
        del exported_backend  # (whisper.cpp's context is freed now, not at interpreter exit)
        verdict = parity_verdict(reference, exported, metric, config.max_gap, config.min_identical, config.format)
        report.update(verdict)
        gap = verdict["gap_points"]
        print(format_table(["model", metric.upper(), "identical texts", "clips"],
                           [["transformers (fp32)", getattr(reference, metric), "", len(clips)],
                            [f"{config.format} ({precision}, {RUNTIMES[config.format]})", getattr(exported, metric),
                             verdict["identical_texts"], len(clips)]]))
        print(f"gap: {gap:+.2f} points (limit {config.max_gap:.2f}); identical texts: {verdict['identical_texts']} "
              f"of {len(clips)} (at least {config.min_identical:.0%})")
        if not verdict["passed"]:
            failed = out.with_name(out.name + ".parity-failed")
            shutil.rmtree(failed, ignore_errors=True)
            partial.rename(failed)
            (failed / EXPORT_REPORT).write_text(json.dumps(report, indent=2))
            raise UserError(f"parity gate failed: the export's {metric.upper()} is {gap:+.2f} points from the "
                            f"transformers model's (limit {config.max_gap}) and {verdict['identical_texts']} of "
                            f"{len(clips)} texts are identical (at least {config.min_identical:.0%}); kept for "
                            f"inspection in {failed}", out)

    # ---- save
    write_card(partial, export_card(config, report, target))
    (partial / EXPORT_REPORT).write_text(json.dumps(report, indent=2))
    save_config(config, partial / EXPORT_CONFIG)
    partial.rename(out)
    loaded = str(out if config.format == "ct2" else out / target.name)
    print(f"exported to {out} (load with {USAGE[config.format].format(loaded, loaded)})")
    return out
