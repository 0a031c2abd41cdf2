"""Training speed and memory: whisper-lora against the recipe the seed notebooks use.

    python bench/train_bench.py            # prints a table, writes bench/results/train_<host>.json

Reference ("seed recipe"): transformers' Seq2SeqTrainer + peft, labels padded to a fixed 128 tokens,
log-mel features computed in the data collator, as in the peft int8 / Hugging Face fine-tuning
notebooks. whisper-lora: `whisper_lora.stages.train.run`. Both: the embedded whisper-base, LoRA r=32,
alpha 64, dropout 0.05 on q_proj/v_proj, the same Mandarin demo clips, batch 8, fp32 (bf16 on CUDA
with --precision bf16 --model openai/whisper-small for the GPU run), no evaluation, no checkpoints.

Two cases: LoRA on encoder + decoder, and decoder-only (frozen encoder; whisper-lora caches encoder
outputs once per clip, the reference recomputes them every step, as Trainer does). Each system runs
in its own process; samples/s excludes the first (warm-up) step; peak memory is the process's peak
RSS on CPU (peak allocated on CUDA). Encoder + decoder also runs whisper-lora with --low-cpu-memory
(freed activations returned to the OS: lower peak RSS, slower steps), with --pack (utterances packed
into 30 s windows: samples/s counts utterances), and with its base weights in 8 bits (LLM.int8) and 4 bits
(NF4), through bitsandbytes' CPU backend on a machine without a GPU.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BATCH = 8
FIXED_LABEL_TOKENS = 128  # the seed notebooks' padding="max_length" length


def peak_memory_mb() -> float:
    """The trainer's own measure (peak accelerator memory on CUDA, peak RSS on CPU), for both systems."""
    import torch

    from whisper_lora.stages.train import peak_memory_mb as measure

    return measure(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def demo_rows(count: int) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in (REPO / "demo" / "data" / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    return [(str(REPO / "demo" / "data" / r["audio"]["path"]), r["sentence"]) for r in rows[:count]]


def run_reference(args) -> dict:
    """The seed recipe, written the way the notebooks write it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback

    from whisper_lora.audio import load_audio
    from whisper_lora.models import load_model

    model, processor = load_model(args.model)
    model.generation_config.language, model.generation_config.task = "zh", "transcribe"
    processor.tokenizer.set_prefix_tokens(language="zh", task="transcribe")
    if args.decoder_only:
        targets = r".*decoder\..*\.(q_proj|v_proj)"
    else:
        targets = ["q_proj", "v_proj"]
    model = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, lora_dropout=0.05, target_modules=targets,
                                             bias="none"))
    rows = [{"audio": load_audio(path), "sentence": text} for path, text in demo_rows(BATCH * (args.steps + 1))]

    def collate(batch):
        features = processor.feature_extractor([b["audio"] for b in batch], sampling_rate=16000,
                                               return_tensors="pt").input_features
        labels = processor.tokenizer([b["sentence"] for b in batch], padding="max_length",
                                     max_length=FIXED_LABEL_TOKENS, return_tensors="pt")
        ids = labels.input_ids.masked_fill(labels.attention_mask.ne(1), -100)
        if (ids[:, 0] == model.config.decoder_start_token_id).all():
            ids = ids[:, 1:]
        return {"input_features": features, "labels": ids}

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        training_args = Seq2SeqTrainingArguments(
            output_dir=out, per_device_train_batch_size=BATCH, max_steps=args.steps + 1, learning_rate=1e-3,
            warmup_steps=0, logging_steps=1, save_strategy="no", report_to=[], remove_unused_columns=False,
            label_names=["labels"], dataloader_num_workers=0, bf16=args.precision == "bf16",
            use_cpu=not torch.cuda.is_available())
        trainer = Seq2SeqTrainer(model=model, args=training_args, train_dataset=rows, data_collator=collate,
                                 callbacks=[Clock()])
        trainer.train()
    return {"samples_per_s": BATCH * args.steps / (stamps[-1] - stamps[0]), "peak_memory_mb": peak_memory_mb()}


def run_ours(args) -> dict:
    from whisper_lora.config import TrainConfig, build_config
    from whisper_lora.stages import train

    # packed: every demo sentence, so that each step's windows are full ones (~7 utterances each)
    rows = demo_rows(320 if args.pack else BATCH * (args.steps + 1))
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "train.jsonl"
        manifest.write_text("".join(json.dumps({"audio": {"path": p}, "sentence": t, "language": "zh"},
                                               ensure_ascii=False) + "\n" for p, t in rows))
        started = time.perf_counter()
        config = build_config(TrainConfig, overrides=dict(
            train_manifest=str(manifest), model=args.model, output_dir=str(Path(tmp) / "run"), batch_size=BATCH,
            max_steps=args.steps + 1, lora_r=32, lora_alpha=64, lora_dropout=0.05, lora_targets="qv",
            freeze_encoder=args.decoder_only, logging_steps=1, tensorboard=False, warmup_steps=0,
            precision=args.precision, timestamp_fraction=0.0, save_steps=10_000, low_cpu_memory=args.low_cpu_memory,
            pack=args.pack, load_in_8bit=args.load_in_8bit, load_in_4bit=args.load_in_4bit))
        summary = train.run(config)
        total = time.perf_counter() - started
    history = [h for h in summary["history"] if "elapsed_s" in h]
    first, last = history[0], history[-1]
    # utterances (samples_seen counts them, packed or not) between the first and the last logged step
    seen = last["samples_per_second"] * last["elapsed_s"] - first["samples_per_second"] * first["elapsed_s"]
    return {"samples_per_s": seen / (last["elapsed_s"] - first["elapsed_s"]),
            "peak_memory_mb": peak_memory_mb(), "setup_and_cache_s": round(total - last["elapsed_s"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per system (after one warm-up step)")
    parser.add_argument("--model", default=None, help="model (default: embedded whisper-base)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--system", choices=("reference", "ours"), help=argparse.SUPPRESS)
    parser.add_argument("--decoder-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--low-cpu-memory", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pack", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--load-in-8bit", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--load-in-4bit", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--only", choices=("packed-and-quantised",), help="run only the --pack, 8-bit and 4-bit "
                        "rows beside the seed recipe and plain fp32")
    args = parser.parse_args()
    if args.system:  # child process: one measurement, printed as JSON
        print("RESULT " + json.dumps(run_reference(args) if args.system == "reference" else run_ours(args)))
        return

    results = []
    runs = [(False, "reference", []), (False, "ours", []), (False, "ours", ["--low-cpu-memory"]),
            (False, "ours", ["--pack"]), (False, "ours", ["--load-in-8bit"]), (False, "ours", ["--load-in-4bit"]),
            (True, "reference", []), (True, "ours", [])]
    if args.only:
        runs = [r for r in runs if not r[0] and (not r[2] or set(r[2]) & {"--pack", "--load-in-8bit", "--load-in-4bit"})]
    for decoder_only, system, flags in runs:
        case = "decoder-only (frozen encoder)" if decoder_only else "encoder + decoder LoRA"
        label = "seed recipe (Seq2SeqTrainer)" if system == "reference" else " ".join(["whisper-lora"] + flags)
        command = [sys.executable, __file__, "--system", system, "--steps", str(args.steps),
                   "--precision", args.precision] + (["--model", args.model] if args.model else []) \
            + (["--decoder-only"] if decoder_only else []) + flags
        done = subprocess.run(command, capture_output=True, text=True)
        line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{label} failed:\n{done.stderr[-3000:]}")
        result = {"case": case, "system": label, **json.loads(line[len("RESULT "):])}
        results.append(result)
        print(json.dumps(result), flush=True)

    import torch

    print(f"\nmodel {args.model or 'embedded whisper-base'}, batch {BATCH}, {args.precision}, LoRA r=32 q/v, "
          f"{args.steps} timed steps; {platform.machine()}, {torch.get_num_threads()} threads, "
          f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}")
    print(f"{'case':<32}{'system':<36}{'utter./s':>10}{'peak MB':>10}{'speed-up':>10}")
    for r in results:
        if not r["system"].startswith("seed"):
            reference = next(x for x in results if x["case"] == r["case"] and x["system"].startswith("seed"))
            r["speedup"] = r["samples_per_s"] / reference["samples_per_s"]
    for r in results:
        speedup = f"{r['speedup']:.2f}x" if "speedup" in r else ""
        print(f"{r['case']:<32}{r['system']:<36}{r['samples_per_s']:>10.2f}{r['peak_memory_mb']:>10.0f}{speedup:>10}")
    out = REPO / "bench" / "results" / f"train_{platform.node() or 'host'}{'_' + args.only if args.only else ''}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"results": results, "steps": args.steps, "precision": args.precision,
                               "model": args.model or "embedded whisper-base"}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
