"""`whisper-lora demo` (`make demo`): the whole path on the embedded model and Mandarin corpus.

Scores the base model, fine-tunes a decoder LoRA on 320 synthetic Mandarin sentences, scores the
result, and checks forgetting on real English speech; then exports the adapter to faster-whisper,
whisper.cpp and openai-whisper, each scored on the test set by its own runtime. Prints the tables and
writes report.json.
"""
from __future__ import annotations

import gc
import json
import time
from pathlib import Path

from ..config import DemoConfig, ExportConfig, TrainConfig, build_config
from ..rundir import ADAPTER_DIR, prepare_run_dir
from ..errors import UserError
from ..decode import TransformersBackend
from ..manifest import read_manifest
from ..models import load_model
from ..report import format_table
from ..scoring import load_clips, score_model
from . import train

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CORPUS = REPO_ROOT / "demo" / "data"
DEFAULT_ENGLISH = DEFAULT_CORPUS / "speech-en"


def english_samples(folder: Path):
    """Every transcripts.json (JSON dict manifest) under `folder`, as English samples."""
    from dataclasses import replace

    return [replace(s, language="en") for f in sorted(folder.rglob("transcripts.json")) for s in read_manifest(f)]


def score(model_spec: str | None, zh_clips, en_clips, new_word_paths: set[str]) -> dict:
    model, processor = load_model(model_spec)
    backend = TransformersBackend(model, processor)
    zh = score_model("zh-test", backend, zh_clips, "zh")
    en = score_model("en", backend, en_clips, "en") if en_clips else None
    del model, backend
    gc.collect()
    return {"cer": zh.cer, "cer_new_words": zh.subset(new_word_paths).cer, "english_wer": en.wer if en else None,
            "rows": zh.rows + (en.rows if en else [])}


def export_to(fmt: str, adapter: Path, manifest: Path, folder: Path) -> dict:
    """The adapter exported for one runtime, gated on `manifest`: the export's report, passed or not (a gate
    that fails keeps its export aside and its numbers in the table); {"error": ...} when it could not run."""
    from .export import EXPORT_REPORT
    from .export import run as export

    # CTranslate2 at float32: int8 costs this small model over a CER point (docs/export.md)
    overrides = dict(model=str(adapter), output_dir=str(folder), format=fmt, dev_manifest=str(manifest),
                     language="zh", metric="cer", overwrite=True, quantization="float32" if fmt == "ct2" else "auto")
    print(f"exporting for {fmt} …")
    try:
        export(build_config(ExportConfig, overrides=overrides))
        return json.loads((folder / EXPORT_REPORT).read_text())
    except UserError as exc:
        failed = folder.with_name(folder.name + ".parity-failed") / EXPORT_REPORT
        return json.loads(failed.read_text()) if failed.is_file() else {"format": fmt, "error": str(exc)}


def run(config: DemoConfig) -> dict:
    # ---- set up
    started = time.time()
    corpus = Path(config.corpus_dir) if config.corpus_dir else DEFAULT_CORPUS
    english_dir = Path(config.english_dir) if config.english_dir else DEFAULT_ENGLISH
    for split in ("train", "dev", "test", "test_new_words"):
        if not (corpus / f"{split}.jsonl").is_file():
            raise UserError(f"demo corpus has no {split}.jsonl (regenerate with demo/make_corpus.py)", corpus)
    # The forgetting row is half the demo's point: a missing folder is an error, not a quietly shorter table.
    en_clips, _ = load_clips(english_samples(english_dir)) if english_dir.is_dir() else ([], [])
    if not en_clips:
        raise UserError("no English clips with a transcripts.json for the forgetting check", english_dir)
    out = prepare_run_dir(config, config.output_dir, overwrite=config.overwrite)
    test_samples = read_manifest(corpus / "test.jsonl") + read_manifest(corpus / "test_new_words.jsonl")
    new_word_paths = {str(s.audio_path) for s in read_manifest(corpus / "test_new_words.jsonl")}
    zh_clips, _ = load_clips(test_samples)

    # ---- base model, fine-tune, fine-tuned model
    print("scoring the base model …")
    base = score(config.model, zh_clips, en_clips, new_word_paths)
    train_config = build_config(TrainConfig, overrides=dict(
        train_manifest=str(corpus / "train.jsonl"), dev_manifest=str(corpus / "dev.jsonl"), model=config.model,
        output_dir=str(out / "train"), epochs=config.epochs, batch_size=config.batch_size,
        learning_rate=config.learning_rate, precision=config.precision, freeze_encoder=True, overwrite=True,
        eval_steps=None))
    training = train.run(train_config)
    print("scoring the fine-tuned model …")
    tuned = score(str(out / "train" / ADAPTER_DIR), zh_clips, en_clips, new_word_paths)

    # ---- the adapter in every runtime users have, each read by its own runtime on the test set
    exports = [export_to(fmt, out / "train" / ADAPTER_DIR, corpus / "test.jsonl", out / "exports" / fmt)
               for fmt in config.exports]

    # ---- save
    report = {
        "base_cer": base["cer"], "finetuned_cer": tuned["cer"],
        "base_cer_new_words": base["cer_new_words"], "finetuned_cer_new_words": tuned["cer_new_words"],
        "english_wer_base": base["english_wer"], "english_wer_finetuned": tuned["english_wer"],
        "train_steps": training["steps"], "train_runtime_s": training["train_runtime_s"],
        "demo_runtime_s": round(time.time() - started, 1),
        "adapter": str(out / "train" / ADAPTER_DIR),
    }
    rows = [["Mandarin test CER", base["cer"], tuned["cer"]],
            ["Mandarin new-words CER", base["cer_new_words"], tuned["cer_new_words"]]]
    if en_clips:
        rows.append(["English WER (forgetting)", base["english_wer"], tuned["english_wer"]])
    table = format_table(["", "base", "fine-tuned"], rows)
    if exports:
        report["exports"] = exports
        table += "\n\n" + format_table(
            ["runtime", "test CER", "ours (transformers)", "identical texts", "parity gate"],
            [[f"{e['runtime']} ({e['format']}, {e['precision']})", e[f"{e['format']}_cer"], e["transformers_cer"],
              f"{e['identical_texts']} of {e['clips']}", "passed" if e["passed"] else "failed"]
             if "error" not in e else [e["format"], "", "", "", e["error"]] for e in exports])
    print(table)
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    (out / "report.md").write_text(table + "\n")
    (out / "predictions.json").write_text(json.dumps({"base": base["rows"], "finetuned": tuned["rows"]},
                                                     indent=2, ensure_ascii=False))
    print(f"report written to {out / 'report.json'} ({report['demo_runtime_s']:.0f} s)")
    return report
