"""How long `whisper-lora check --no-audio` takes on a 100,000-row manifest (the target: under a minute).

    python bench/check_bench.py [--rows 100000] [--dev-rows 2000]   # writes bench/results/check_<host>.json

The corpus is synthetic but shaped like a real one: JSON lines with Chinese and English transcripts,
audio spread over 1,000 folders, files of varied sizes (--no-audio never decodes them, so their bytes
need not be audio), a few broken rows, and a dev manifest sharing some texts and files with train.
Each run is the real CLI in a fresh process, so Python start-up, imports and tokenizer loading count.
The embedded model is converted once beforehand (a one-time cost per machine, not per check).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHINESE = "他们现在去商店买鸡蛋你下午银行苹果早上她在看电影我们公园天气很好开始开会"
ENGLISH = "the quick brown fox jumps over a lazy dog while seven people read books at noon".split()


def make_corpus(folder: Path, rows: int, dev_rows: int, seed: int = 0) -> tuple[Path, Path]:
    rng = random.Random(seed)
    texts = []
    for i in range(rows + dev_rows):
        if i % 4 == 3:
            texts.append((" ".join(rng.choice(ENGLISH) for _ in range(rng.randint(4, 20))), "en"))
        else:
            texts.append(("".join(rng.choice(CHINESE) for _ in range(rng.randint(6, 30))), "zh"))
    audio = []
    for i in range(rows + dev_rows):
        rel = f"clips/{i % 1000:03d}/{i:07d}.wav"
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(rng.randint(2_000, 60_000)))
        audio.append(rel)
    train, dev = folder / "train.jsonl", folder / "dev.jsonl"
    with open(train, "w", encoding="utf-8") as f:
        for i in range(rows):
            text, language = texts[i]
            row = {"audio": {"path": audio[i]}, "sentence": text, "language": language,
                   "duration": round(rng.uniform(1, 12), 2)}
            if i % 10_000 == 1:
                row["audio"]["path"] = f"missing/{i}.wav"  # a few broken rows, as in real data
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    with open(dev, "w", encoding="utf-8") as f:
        for j in range(dev_rows):
            i = rows + j
            text, language = texts[j * 7] if j % 50 == 0 else texts[i]  # 2% of dev texts also in train
            f.write(json.dumps({"audio": {"path": audio[i]}, "sentence": text, "language": language},
                               ensure_ascii=False) + "\n")
    return train, dev


def timed_check(*args: str) -> tuple[float, int, str]:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "whisper_lora", "check", *args], capture_output=True, text=True,
                            cwd=REPO)
    seconds = time.perf_counter() - start
    if result.returncode == 2:
        sys.exit(result.stderr)
    return seconds, result.returncode, result.stdout.strip().splitlines()[-2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dev-rows", type=int, default=2_000)
    args = parser.parse_args()

    from whisper_lora.models import resolve_model

    resolve_model(None)  # one-time conversion of the embedded model, outside the timings
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        train, dev = make_corpus(Path(tmp), args.rows, args.dev_rows)
        print(f"corpus: {args.rows} train + {args.dev_rows} dev rows in {time.perf_counter() - t0:.1f} s")
        runs = {}
        for name, extra in (("train only", []), ("train + dev (leakage)", ["--dev", str(dev)])):
            seconds, code, summary = timed_check(str(train), "--no-audio", *extra)
            runs[name] = {"seconds": round(seconds, 1), "exit_code": code, "summary": summary}
            print(f"{name:24s} {seconds:6.1f} s  exit {code}  {summary}")
    out = REPO / "bench" / "results" / f"check_{platform.node() or 'host'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": args.rows, "dev_rows": args.dev_rows, "cpus": os.cpu_count(),
                               "python": platform.python_version(), "runs": runs}, indent=1) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
