"""Packed against unpacked training on the demo corpus: one epoch each, then CER on the test clips.

    python bench/pack_bench.py                    # prints the table, writes bench/results/pack_<host>.json

Both runs train encoder + decoder LoRA (r=32 on q/v, the demo's learning rate) on the embedded
whisper-base over the 320 Mandarin training sentences of demo/data, for one epoch, without a dev set:
unpacked with the demo's batch of 8 clips; packed (`--pack`) with batches of 2 windows of ~7
utterances each, so that one epoch still takes ~20 optimizer steps, and a warm-up scaled to match.
The encoder path is the one packing is for: with a frozen encoder the encoder outputs of single clips
are cached once and packing has nothing left to save.

Reported per run: training wall time (the run's own clock, model loading excluded), utterances/s, and
CER on demo/data/test.jsonl (40 single clips) and on test_new_words.jsonl, scored by `whisper-lora
evaluate` with greedy decoding.

Long-form and timestamps: the 40 test clips joined into two ~100 s files with 0.6-1.5 s pauses (as the
inference bench builds its long files), transcribed with timestamps by openai/whisper's sequential
algorithm (each next window starts at the last timestamp, so bad timestamps lose or repeat speech)
by the base model and both adapters: CER over each file, and how far each segment's start lies from
the nearest true clip start (median and share within 0.5 s).
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
from dataclasses import replace
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "demo" / "data"
COMMON = ["--train-manifest", str(DEMO / "train.jsonl"), "--language", "zh", "--lora-r", "32", "--lora-alpha", "64",
          "--lora-targets", "qv", "--learning-rate", "0.001", "--epochs", "1", "--no-tensorboard", "--save-steps",
          "100000", "--timestamp-fraction", "0"]
RUNS = {"unpacked": ["--batch-size", "8", "--warmup-steps", "10"],
        "packed": ["--pack", "--batch-size", "2", "--warmup-steps", "3"]}


def cli(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "whisper_lora", *args], capture_output=True, text=True, cwd=REPO)
    if result.returncode:
        sys.exit(f"whisper-lora {args[0]} failed:\n{result.stderr[-3000:]}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, help="folder to keep the two runs in (default: a temporary one)")
    parser.add_argument("--reuse", action="store_true", help="skip training and scoring where --keep holds a run")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / f"pack_{platform.node()}.json")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="pack-bench-"))
    results = {}
    previous = json.loads(args.out.read_text())["runs"] if args.reuse and args.out.is_file() else {}
    for name, flags in RUNS.items():
        if name in previous and (work / name / "adapter").is_dir():
            results[name] = previous[name]
            continue
        print(f"training {name} ...", flush=True)
        cli("train", *COMMON, *flags, "--output-dir", str(work / name), "--overwrite")
        metrics = json.loads((work / name / "metrics.json").read_text())
        logged = [h for h in metrics["history"] if "elapsed_s" in h]
        seconds = logged[-1]["elapsed_s"]
        row = {"steps": metrics["steps"], "utterances": metrics["samples_seen"], "train_s": round(seconds, 1),
               "utterances_per_s": round(metrics["samples_seen"] / seconds, 3)}
        for test in ("test", "test_new_words"):
            report = work / f"{name}-{test}.json"
            cli("evaluate", str(DEMO / f"{test}.jsonl"), "--models", str(work / name / "adapter"), "--language", "zh",
                "--output", str(report))
            row[f"{test}_cer"] = round(json.loads(report.read_text())["models"][0]["cer"] * 100, 2)
        results[name] = row
        print(name, row, flush=True)

    long_form = long_form_check(work, {"base": None, **{name: work / name / "adapter" for name in RUNS}})

    unpacked, packed = results["unpacked"], results["packed"]
    print(f"\none epoch on demo/data/train.jsonl (320 clips), encoder + decoder LoRA r=32 q/v; "
          f"{platform.machine()}, CPU\n")
    print("| run | steps | train wall time | utterances/s | test CER | new-word CER |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['steps']} | {r['train_s']:.0f} s | {r['utterances_per_s']:.2f} | {r['test_cer']:.2f}% "
              f"| {r['test_new_words_cer']:.2f}% |")
    print(f"\npacked/unpacked wall time: 1/{unpacked['train_s'] / packed['train_s']:.2f}; "
          f"test CER difference: {packed['test_cer'] - unpacked['test_cer']:+.2f} points")
    print("\nlong-form, two files of 20 test clips with pauses (sequential decoding with timestamps, greedy)\n")
    print("| model | file | CER | segments | clips | start error, median | starts within 0.5 s |")
    print("|---|---|---|---|---|---|---|")
    for name, files in long_form.items():
        for f in files:
            print(f"| {name} | {f['file']} ({f['seconds']:.0f} s) | {f['cer']:.2f}% | {f['segments']} | {f['clips']} "
                  f"| {f['start_error_median_s']:.2f} s | {f['starts_within_0.5s']:.0%} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": platform.node(), "runs": results, "long_form": long_form,
                                    "work": str(work)}, indent=2))


def long_form_check(work: Path, models: dict[str, Path | None]) -> dict[str, list[dict]]:
    import numpy as np
    import soundfile as sf

    sys.path.insert(0, str(REPO))
    from infer_bench import join_with_pauses
    from whisper_lora.audio import load_audio
    from whisper_lora.constants import MAX_NEW_TOKENS
    from whisper_lora.decode import GREEDY, TransformersBackend
    from whisper_lora.manifest import read_manifest
    from whisper_lora.models import load_model
    from whisper_lora.text import error_rate

    samples = read_manifest(DEMO / "test.jsonl")
    rng = np.random.default_rng(0)
    files = []
    for n, part in enumerate((samples[:20], samples[20:])):
        audio, starts = join_with_pauses([load_audio(sample.audio_path) for sample in part], rng)
        path = work / f"long_zh_{n}.wav"
        sf.write(path, audio, 16000)
        files.append((path, "".join(s.text for s in part), starts, len(audio) / 16000))
    options = replace(GREEDY, max_new_tokens=MAX_NEW_TOKENS)
    report = {}
    for name, model in models.items():
        backend = TransformersBackend(*load_model(str(model) if model else None), device="cpu")
        rows = []
        for path, reference, starts, seconds in files:
            segments = list(backend.transcribe(str(path), "zh", options)[0])
            hypothesis = "".join(s.text for s in segments)
            errors = [min(abs(s.start - t) for t in starts) for s in segments]
            rows.append({"file": path.stem, "seconds": seconds, "clips": len(starts), "segments": len(segments),
                         "cer": round(error_rate([reference], [hypothesis], "cer", ["zh"]) * 100, 2),
                         "start_error_median_s": float(np.median(errors)) if errors else float("nan"),
                         "starts_within_0.5s": float(np.mean([e <= 0.5 for e in errors])) if errors else 0.0})
        report[name] = rows
        print(name, rows, flush=True)
    return report


if __name__ == "__main__":
    main()
