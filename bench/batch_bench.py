"""Transcribing a corpus: one `transcribe` process against the same command on Ray Data, on this machine.

    python bench/batch_bench.py                # prints the table, writes bench/results/batch_<host>.json
    python bench/batch_bench.py --files 100

The corpus: `--files` (220) recordings of real English speech made of the repository's real clips
(demo/data/speech-en: CMU ARCTIC sentences and card names), one to four of them per file in a random
order, with pauses and a random gain, 1-25 s each. Every configuration runs the real command line in a fresh
process and is timed from start to exit (model loading and, for Ray, starting Ray and its actors
included): what a user waits for. WER against the references checks that every run read the same files.

Ray's overhead = Ray's wall time / the single process's - 1, with the same CPUs doing the decoding. With
`--repeats N` the configurations run in turn N times (one process, Ray, Ray, one process, …) and each ratio is
the median of the rounds' own ratios: this shared machine's speed drifts by 15-20% between minutes, more than
the 10% the overhead is held to, so one run of each tells little.
The projection to N machines assumes the per-worker rate measured here and no shared bottleneck (the
files are read from local disk or object storage by each worker, and nothing else is shared).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SPEECH_EN = REPO / "demo" / "data" / "speech-en"
SR = 16000


def build_corpus(folder: Path, files: int) -> dict[str, str]:
    """{file path: reference text}: `files` recordings made of the real clips of demo/data/speech-en (CMU
    ARCTIC sentences, card names), each one to four of them in a random order with 0.3-1.5 s pauses and a
    random gain, 1-25 s long: real speech in files that all differ."""
    import soundfile as sf

    from whisper_lora.audio import load_audio
    from whisper_lora.manifest import read_manifest

    samples = [s for f in sorted(SPEECH_EN.rglob("transcripts.json")) for s in read_manifest(f)]
    clips = [(load_audio(s.audio_path), s.text) for s in samples]
    rng = np.random.default_rng(0)
    corpus = {}
    for n in range(files):
        chosen = [clips[i] for i in rng.choice(len(clips), size=int(rng.integers(1, 5)), replace=False)]
        pieces = []
        for audio, _ in chosen:
            pieces += [audio * rng.uniform(0.4, 1.0), np.zeros(int(SR * rng.uniform(0.3, 1.5)), np.float32)]
        path = folder / f"rec_{n:04d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, np.concatenate(pieces).astype(np.float32), SR)
        corpus[str(path)] = " ".join(text for _, text in chosen)
    return corpus


def timed(command: list[str]) -> float:
    started = time.monotonic()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1"))
    if result.returncode != 0:
        sys.exit(f"{' '.join(command[2:5])} failed:\n{result.stderr[-3000:]}")
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=220, help="recordings made of the repository's real clips")
    parser.add_argument("--model", default=None, help="default: the embedded whisper-base")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of every configuration, in turn")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / f"batch_{platform.node()}.json")
    args = parser.parse_args()
    from whisper_lora.batch import read_shards
    from whisper_lora.report import format_table, machine
    from whisper_lora.text import error_rate

    work = Path(tempfile.mkdtemp(prefix="batch-bench-"))
    corpus = build_corpus(work / "audio", args.files)
    audio_s = sum(__import__("soundfile").info(p).duration for p in corpus)
    cpus = os.cpu_count() or 1
    base = [sys.executable, "-m", "whisper_lora", "transcribe", str(work / "audio"), "--language", "en",
            *(["--model", args.model] if args.model else [])]
    configs = [("transcribe (one process)", cpus, 1, base + ["--output-format", "jsonl", "--output",
                                                              str(work / "single.jsonl")])]
    for workers in sorted({cpus, 1}, reverse=True):
        per = max(1, cpus // workers)
        configs.append((f"transcribe --ray, {workers} worker{'s' * (workers > 1)} x {per} CPU", cpus, workers,
                        base + ["--ray", "--output-dir", str(work / f"ray-{workers}"), "--num-workers", str(workers),
                                "--cpus-per-worker", str(per)]))
    walls: dict[str, list[float]] = {name: [] for name, *_ in configs}
    texts_of: dict[str, dict[str, str]] = {}
    for round_ in range(args.repeats):
        for name, used_cpus, workers, command in configs:
            if "--ray" in command:  # a fresh output folder: the same command again would resume, not transcribe
                shutil.rmtree(command[command.index("--output-dir") + 1], ignore_errors=True)
            walls[name].append(timed(command))
            if "--ray" in command:
                shards, _ = read_shards(command[command.index("--output-dir") + 1], set_aside=False)
                texts_of[name] = {r["path"]: r["text"] or "" for r in shards}
            else:
                texts_of[name] = {}
                for line in Path(work / "single.jsonl").read_text().splitlines():
                    row = json.loads(line)
                    texts_of[name][row["path"]] = row["text"]
            print(f"round {round_ + 1}: {name}: {walls[name][-1]:.1f} s", flush=True)
    rows = []
    single_name = configs[0][0]
    for name, used_cpus, workers, command in configs:
        texts, paths = texts_of[name], list(corpus)
        wer = error_rate([corpus[p] for p in paths], [texts.get(p, "") for p in paths], "wer", ["en"] * len(paths))
        wall = statistics.median(walls[name])
        rate = audio_s / wall
        ratios = [mine / single for mine, single in zip(walls[name], walls[single_name])]
        rows.append({"system": name, "workers": workers, "files": len(texts), "wall_s": round(wall, 1),
                     "wall_s_runs": [round(w, 1) for w in walls[name]],
                     "audio_hours_per_wall_hour": round(rate, 1),
                     "per_worker": round(rate / workers, 1), "wer": round(wer * 100, 2),
                     "vs_one_process": round(statistics.median(ratios), 3),
                     "vs_one_process_runs": [round(r, 3) for r in ratios]})
        print(rows[-1], flush=True)
    print(f"\n{len(corpus)} real-speech files, {audio_s / 60:.1f} min of audio; {machine()}\n")
    print(format_table(["system", "files", "wall s", "x one process", "audio-h per wall-h", "per worker", "WER"],
                       [[r["system"], r["files"], f"{r['wall_s']:.1f}", f"{r['vs_one_process']:.2f}",
                         f"{r['audio_hours_per_wall_hour']:.1f}", f"{r['per_worker']:.1f}", f"{r['wer']:.2f}%"]
                        for r in rows]))
    best = max(rows[1:], key=lambda r: r["audio_hours_per_wall_hour"])
    machine_rate = best["audio_hours_per_wall_hour"]
    print(f"\nOn paper, from '{best['system']}' ({machine_rate:.1f} audio-hours per wall-hour per machine like "
          "this one): " + ", ".join(f"{n} machines ~{n * machine_rate:.0f}" for n in (1, 10, 100))
          + " audio-hours per wall-hour; 10,000 h of audio on 100 such machines: "
          f"~{10000 / (100 * machine_rate):.1f} h.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "cpus": cpus, "files": len(corpus),
                                    "audio_s": round(audio_s, 1), "repeats": args.repeats, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
