"""The encoder context's floor, measured: WER and time per setting of `--audio-ctx` on short English clips.

    python bench/context_bench.py            # prints a table, writes bench/results/context_<host>.json
    python bench/context_bench.py --model runs/x/adapter   # an adapter (e.g. one trained with --acft)

Clips: the seven real recordings in demo/data/speech-en (CMU ARCTIC, CMU Sphinx; 2-9 s) and the first
`--synthetic` clips of demo/data/test_en_large.jsonl (espeak-ng, many voices; 2-4 s). Each clip is
transcribed alone (as a request or a realtime buffer is), greedy, language given, with the transformers
backend, once per setting; the time is the best of `--repeat` per clip. `full` is Whisper's 30 s;
`auto@F` is `auto` with an F-second floor (the number form of --audio-ctx).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SETTINGS = ["full", 15.0, 10.0, 8.0, 5.0, 3.0, 2.0]


def clips(synthetic: int) -> list[tuple[str, object, str]]:
    from whisper_lora.audio import load_audio
    from whisper_lora.manifest import read_manifest

    real = [s for f in sorted((REPO / "demo" / "data" / "speech-en").rglob("transcripts.json")) for s in read_manifest(f)]
    made = read_manifest(REPO / "demo" / "data" / "test_en_large.jsonl")[:synthetic]
    return [("real", load_audio(s.audio_path), s.text) for s in real] + \
           [("espeak", load_audio(s.audio_path), s.text) for s in made]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model or adapter (default: the embedded whisper-base)")
    parser.add_argument("--synthetic", type=int, default=48, help="espeak-ng clips beside the 7 real ones")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / f"context_{platform.node() or 'host'}.json"))
    args = parser.parse_args()

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    from whisper_lora.audio_ctx import describe, encoder_frames
    from whisper_lora.decode import GREEDY, TransformersBackend
    from whisper_lora.models import load_model
    from whisper_lora.report import format_table, machine
    from whisper_lora.text import error_rate

    backend = TransformersBackend(*load_model(args.model), device="cpu")
    data = clips(args.synthetic)
    backend.transcribe(data[0][1], "en", GREEDY)  # warm-up
    results = {}
    for setting in SETTINGS:
        options = replace(GREEDY, audio_ctx=setting)
        hypotheses, seconds = [], []
        for _, audio, _ in data:
            best = float("inf")
            for _ in range(args.repeat):
                started = time.perf_counter()
                segments, _ = backend.transcribe(audio, "en", options)
                text = " ".join(s.text for s in segments)
                best = min(best, time.perf_counter() - started)
            hypotheses.append(text)
            seconds.append(best)
        row = {"wall_s": sum(seconds), "frames": sorted({encoder_frames(len(a) // 160 + 1, setting) for _, a, _ in data})}
        for group in ("real", "espeak"):
            index = [i for i, (g, _, _) in enumerate(data) if g == group]
            row[f"{group}_wer"] = error_rate([data[i][2] for i in index], [hypotheses[i] for i in index], "wer",
                                             ["en"] * len(index))
            row[f"{group}_s"] = sum(seconds[i] for i in index)
        row["wer"] = error_rate([t for _, _, t in data], hypotheses, "wer", ["en"] * len(data))
        row["hypotheses"] = hypotheses
        name = "full" if setting == "full" else f"auto@{describe(setting)}"
        results[name] = row
        print(f"{name}: {row['wall_s']:.1f} s, WER {row['wer']:.2%}", file=sys.stderr, flush=True)

    base = results["full"]
    audio_s = sum(len(a) for _, a, _ in data) / 16000
    where = f"{machine()}, torch {torch.__version__}"
    print(f"\n{len(data)} clips ({audio_s:.0f} s: 7 real, {len(data) - 7} espeak-ng), each alone, greedy; {where}")
    print(format_table(["context", "encoder frames", "time s", "x full", "WER", "real WER", "espeak WER"],
                       [[n, ",".join(map(str, r["frames"])), f"{r['wall_s']:.1f}", f"{r['wall_s'] / base['wall_s']:.2f}",
                         r["wer"], r["real_wer"], r["espeak_wer"]] for n, r in results.items()]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": where, "clips": len(data), "audio_seconds": audio_s,
                                          "model": args.model, "repeat": args.repeat, "results": results}, indent=2))


if __name__ == "__main__":
    main()
