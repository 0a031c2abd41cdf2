"""Forgetting guard on the demo corpus: does replaying English keep English while Mandarin improves?

    python bench/forgetting_bench.py                      # prints a table, writes bench/results/forgetting_<host>.json
    python bench/forgetting_bench.py --runs no-guard replay  # two trainings instead of three

The shared notes report English error rising from 3% to 11% after a Mandarin LoRA on the demo
corpus. This runs that case three ways on the embedded whisper-base:

  base        no training
  no guard    Mandarin LoRA; the English retain set is only evaluated (--retain-manifest)
  replay      the same run with --replay-ratio: a share of every epoch is English retain samples,
              trained on their labels (cross-entropy)
  distill     the same replayed samples trained with --replay-loss distill: KL divergence to the base
              model's own predictions (the adapters switched off) instead of cross-entropy

and scores each on held-out sets none of the runs trained on: Mandarin `test` + `test_new_words`,
synthetic English `test_en` (32 clips) and `test_en_large` (128), and the real English clips in
demo/data/speech-en.

The retain set (`--retain-set large`: `retain_en_large`, 320 clips, so one epoch's replay never repeats
a clip; `small`: `retain_en`, 64 clips, replayed more than once per epoch) holds other sentences than
the test sets. It is labelled with the base model's own transcripts by default
(`--retain-labels base`), the way a user builds one from any English audio:

    whisper-lora transcribe english/ --language en --output-format jsonl --output retain.jsonl

Replaying the true texts instead (`--retain-labels reference`) teaches the synthetic voice itself,
which makes `test_en` in-domain and no longer a measure of forgetting.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CORPUS = REPO / "demo" / "data"
REAL_ENGLISH = CORPUS / "speech-en"
RETAIN_SETS = {"large": CORPUS / "retain_en_large.jsonl", "small": CORPUS / "retain_en.jsonl"}


def held_out_sets() -> dict:
    from whisper_lora.manifest import read_manifest
    from whisper_lora.stages.demo import english_samples
    from whisper_lora.scoring import load_clips

    sets = {"Mandarin test CER": ("zh", read_manifest(CORPUS / "test.jsonl") + read_manifest(CORPUS / "test_new_words.jsonl")),
            "English test_en WER": ("en", read_manifest(CORPUS / "test_en.jsonl")),
            "English test_en_large WER": ("en", read_manifest(CORPUS / "test_en_large.jsonl")),
            "English real clips WER": ("en", english_samples(REAL_ENGLISH))}
    return {name: (language, load_clips(samples)[0]) for name, (language, samples) in sets.items()}


def load(model_spec: str | None):
    from whisper_lora.decode import TransformersBackend
    from whisper_lora.models import load_model

    return TransformersBackend(*load_model(model_spec))


def score(transcriber, sets: dict) -> dict:
    from whisper_lora.scoring import score_model

    scores = {}
    for name, (language, clips) in sets.items():
        result = score_model(name, transcriber, clips, language, progress=False)
        if language == "zh":
            scores[name] = result.cer
        else:
            scores[name], scores[name.replace("WER", "CER")] = result.wer, result.cer
    return scores


def base_transcripts(transcriber, retain: Path, out: Path) -> Path:
    """The retain set with the base model's own transcripts as labels: the rows `transcribe --output-format jsonl` writes."""
    from whisper_lora.manifest import read_manifest
    from whisper_lora.scoring import load_clips, score_model

    clips, _ = load_clips(read_manifest(retain))
    rows = score_model("retain", transcriber, clips, "en", progress=False).rows
    out.write_text("".join(json.dumps({"path": r["audio"], "text": r["hypothesis"], "language": "en"}) + "\n"
                           for r in rows if r["hypothesis"].strip()))
    return out


def train(out: Path, args, replay_ratio: float, replay_loss: str, retain: Path) -> dict:
    from whisper_lora.config import TrainConfig, build_config
    from whisper_lora.stages import train as train_stage

    config = build_config(TrainConfig, overrides=dict(
        train_manifest=str(CORPUS / "train.jsonl"), dev_manifest=str(CORPUS / "dev.jsonl"),
        retain_manifest=str(retain), replay_ratio=replay_ratio, replay_loss=replay_loss, output_dir=str(out),
        epochs=args.epochs, batch_size=8, learning_rate=args.learning_rate, lora_targets=args.targets,
        freeze_encoder=args.decoder_only, tensorboard=False, overwrite=True))
    summary = train_stage.run(config)
    return {"adapter": str(out / train_stage.ADAPTER_DIR), "steps": summary["steps"],
            "train_runtime_s": summary["train_runtime_s"],
            "curve": [h for h in summary["history"] if "retain_wer" in h], "history": summary["history"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--targets", default="qv", help="LoRA target preset (see train --lora-targets)")
    parser.add_argument("--decoder-only", action="store_true", help="frozen encoder (fast, but barely forgets)")
    parser.add_argument("--replay-ratio", type=float, default=0.2)
    parser.add_argument("--retain-labels", choices=("base", "reference"), default="base",
                        help="label the replayed English with the base model's transcripts, or with the true text")
    parser.add_argument("--retain-set", choices=tuple(RETAIN_SETS), default="large",
                        help="the English replayed and scored during training (see above)")
    parser.add_argument("--runs", nargs="+", choices=("no-guard", "replay", "distill"),
                        default=["no-guard", "replay", "distill"], help="which trainings to run beside the base model")
    parser.add_argument("--out", type=Path, help="where the JSON results go "
                                                  "(default: bench/results/forgetting_<host>.json)")
    args = parser.parse_args()

    started = time.time()
    sets = held_out_sets()
    retain_source = RETAIN_SETS[args.retain_set]
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = load(None)
        results = {"base": score(base, sets)}
        retain = base_transcripts(base, retain_source, Path(tmp) / "retain_base.jsonl") \
            if args.retain_labels == "base" else retain_source
        del base
        gc.collect()
        plans = {"no-guard": ("no guard", 0.0, "labels"),
                 "replay": (f"replay {args.replay_ratio:g}", args.replay_ratio, "labels"),
                 "distill": (f"distill {args.replay_ratio:g}", args.replay_ratio, "distill")}
        for key in args.runs:
            name, ratio, loss = plans[key]
            runs[name] = train(Path(tmp) / key, args, ratio, loss, retain)
            results[name] = score(load(runs[name]["adapter"]), sets)
            gc.collect()

    from whisper_lora.report import format_table

    columns = list(results["base"])
    print(f"\nwhisper-base, {args.epochs:g} epochs of Mandarin LoRA ({args.targets}, retain labels {args.retain_labels}, "
          f"{'decoder only' if args.decoder_only else 'encoder + decoder'}), retain set {args.retain_set}, "
          f"lr {args.learning_rate:g}; "
          f"{platform.machine()}, {time.time() - started:.0f} s")
    print(format_table(["run"] + columns, [[name] + [scores[c] for c in columns] for name, scores in results.items()]))
    print(f"\nretain-set ({retain_source.stem}) WER at each evaluation during training:")
    for name, run in runs.items():
        print(f"  {name:<12}" + "  ".join(f"step {h['step']}: {h['retain_wer']:.1%}" for h in run["curve"]))
    out = args.out or REPO / "bench" / "results" / f"forgetting_{platform.node() or 'host'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": {**vars(args), "out": str(out)}, "held_out": results,
                               "runs": {k: {kk: vv for kk, vv in v.items() if kk != "adapter"} for k, v in runs.items()}},
                              indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
