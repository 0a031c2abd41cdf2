"""Inference speed, memory and WER: whisper-lora's two backends against the tools people use.

    python bench/infer_bench.py                  # prints a table, writes bench/results/infer_<host>.json
    python bench/infer_bench.py --repeat 2       # each file timed twice, the faster kept (shared machines)
    python bench/infer_bench.py --systems "whisper-lora transformers" --model runs/x/adapter   # an adapter

Systems, all on the embedded whisper-base, greedy decoding (beam 1, no temperature fallback, no
previous-text conditioning, no VAD), language given, on the same files:
  whisper-lora transformers   our TransformersBackend (sequential long-form in blocks; "vad": batched speech windows)
  transformers pipeline       pipeline("automatic-speech-recognition", chunk_length_s=30)
  transformers pipeline ts    the same with return_timestamps=True (chunks merged on timestamps)
  whisper-lora ct2 <type>     our CT2Backend (faster-whisper underneath, our block reader)
  ... @auto, @default         a whisper-lora system at --audio-ctx auto (the encoder fed the audio plus 1 s,
                              at least 10 s) or at the model's own context (an --acft adapter's floor);
                              without either, at Whisper's full 30 s
  faster-whisper <type>       faster_whisper.WhisperModel.transcribe called directly
Each system runs in its own process (model loading excluded from the time; peak RSS from GNU time
includes it). Ratios compare systems measured in this same run. Time and WER are also given apart
for the clips (<= 30 s: every system decodes all of their speech) and the long files (where a
system that drops words also saves the time to decode them).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SPEECH_EN = REPO / "demo" / "data" / "speech-en"
from whisper_lora.constants import SAMPLE_RATE  # noqa: E402 (after the path above)
SYSTEMS = ["whisper-lora transformers", "whisper-lora transformers @auto", "whisper-lora transformers vad",
           "transformers pipeline", "transformers pipeline ts", "whisper-lora ct2 float32", "faster-whisper float32",
           "whisper-lora ct2 int8", "whisper-lora ct2 int8 @auto", "faster-whisper int8"]


def build_corpus(folder: Path) -> list[tuple[Path, str]]:
    """The real clips one by one, plus two long files of the same clips with pauses (> 30 s each)."""
    import soundfile as sf

    from whisper_lora.audio import load_audio
    from whisper_lora.manifest import read_manifest

    samples = [s for f in sorted(SPEECH_EN.rglob("transcripts.json")) for s in read_manifest(f)]
    items = [(s.audio_path, s.text) for s in samples]
    clips = [(load_audio(s.audio_path), s.text) for s in samples]
    rng = np.random.default_rng(0)
    for n in range(2):
        chosen = [(clips * 4)[i] for i in rng.permutation(len(clips * 4))]
        audio, _ = join_with_pauses([clip for clip, _ in chosen], rng)
        path = folder / f"long_{n}.wav"
        sf.write(path, audio, SAMPLE_RATE)
        items.append((path, " ".join(text for _, text in chosen)))
    return items


def join_with_pauses(clips: list[np.ndarray], rng: np.random.Generator) -> tuple[np.ndarray, list[float]]:
    """Clips one after another, each followed by a 0.6-1.5 s pause as between sentences; and where each
    clip starts (s). The long files of the inference, realtime and packing benchmarks."""
    pieces, starts, at = [], [], 0.0
    for audio in clips:
        pause = np.zeros(int(SAMPLE_RATE * rng.uniform(0.6, 1.5)), np.float32)
        starts.append(at)
        pieces += [audio, pause]
        at += (len(audio) + len(pause)) / SAMPLE_RATE
    return np.concatenate(pieces), starts


def run_system(name: str, files: list[str], repeat: int = 1, model: str | None = None) -> dict:
    from whisper_lora.constants import MAX_NEW_TOKENS
    from whisper_lora.decode import GREEDY, CT2Backend
    from whisper_lora.models import ct2_model_dir

    options = replace(GREEDY, max_new_tokens=MAX_NEW_TOKENS)
    name, _, setting = name.partition(" @")  # "… @auto", "… @default" (the model's own: an --acft adapter's)
    options = replace(options, audio_ctx={"": "full", "default": None}.get(setting, setting))
    compute = name.rsplit(" ", 1)[-1]
    if name.startswith("whisper-lora transformers"):
        from whisper_lora.decode import load_backend

        transcriber = load_backend(model, device="cpu")  # as `transcribe` loads it: an adapter's recorded context
        vad = name.endswith("vad")  # speech regions packed into 30 s windows, decoded 8 at a time
        run = lambda f: " ".join(s.text for s in transcriber.transcribe(f, "en", options, vad=vad)[0])  # noqa: E731
    elif name.startswith("transformers pipeline"):
        from transformers import pipeline

        from whisper_lora.models import resolve_model

        asr = pipeline("automatic-speech-recognition", model=resolve_model(None).location, device="cpu",
                       chunk_length_s=30)
        from whisper_lora.audio import load_audio

        # The pipeline decodes file names with an ffmpeg binary this machine may lack; it gets the same
        # decoded samples, and the decoding stays inside the timed region as for every other system.
        timestamps = name.endswith(" ts")
        run = lambda f: asr({"raw": load_audio(f), "sampling_rate": 16000}, return_timestamps=timestamps,  # noqa: E731
                            generate_kwargs={"language": "en", "task": "transcribe", "num_beams": 1})["text"]
    elif name.startswith("whisper-lora ct2"):
        transcriber = CT2Backend(ct2_model_dir(None), compute, device="cpu")
        run = lambda f: " ".join(s.text for s in transcriber.transcribe(f, "en", options)[0])  # noqa: E731
    else:
        from faster_whisper import WhisperModel

        model = WhisperModel(ct2_model_dir(None), device="cpu", compute_type=compute)

        def run(f):
            segments, _ = model.transcribe(f, language="en", beam_size=1, best_of=1, temperature=0.0,
                                           compression_ratio_threshold=None, log_prob_threshold=None,
                                           no_speech_threshold=None, condition_on_previous_text=False)
            return " ".join(s.text.strip() for s in segments)
    run(files[0])  # warm-up: first-call allocations and lazy imports are not what we compare
    hypotheses, file_s = [], [float("inf")] * len(files)
    for _ in range(repeat):  # best of `repeat` per file: on a shared machine, other jobs only add time
        hypotheses = []
        for i, f in enumerate(files):
            started = time.perf_counter()
            hypotheses.append(run(f))
            file_s[i] = min(file_s[i], time.perf_counter() - started)
    return {"wall_s": sum(file_s), "file_s": file_s, "hypotheses": hypotheses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--system", help=argparse.SUPPRESS)
    parser.add_argument("--files", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--systems", nargs="*", default=SYSTEMS, help="subset of systems to run")
    parser.add_argument("--model", help="a model or adapter for the whisper-lora transformers systems (default: the "
                                            "embedded whisper-base; the other systems always run it)")
    parser.add_argument("--repeat", type=int, default=1, help="time each file this many times, keep the fastest")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / f"infer_{platform.node() or 'host'}.json"))
    args = parser.parse_args()
    if args.system:  # child process: one system
        import transformers

        transformers.logging.set_verbosity_error()
        print("RESULT " + json.dumps(run_system(args.system, args.files, args.repeat, args.model)))
        return

    from whisper_lora.audio import audio_duration
    from whisper_lora.report import format_table, machine
    from whisper_lora.text import error_rate

    with tempfile.TemporaryDirectory() as tmp:
        items = build_corpus(Path(tmp))
        files = [str(p) for p, _ in items]
        references = [t for _, t in items]
        durations = [audio_duration(p) for p, _ in items]
        seconds = sum(durations)
        groups = {"clips": [i for i, d in enumerate(durations) if d <= 30],
                  "long": [i for i, d in enumerate(durations) if d > 30]}
        results = {}
        for name in args.systems:
            proc = subprocess.run(["/usr/bin/time", "-f", "PEAK_KB %M", sys.executable, __file__, "--system", name,
                                   "--repeat", str(args.repeat), *(["--model", args.model] if args.model else []),
                                   "--files", *files],
                                  capture_output=True, text=True, env=dict(os.environ))
            lines = proc.stdout.splitlines() + proc.stderr.splitlines()
            result_line = [ln for ln in lines if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not result_line:
                print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            result = json.loads(result_line[-1][7:])
            result["peak_mb"] = int([ln for ln in lines if ln.startswith("PEAK_KB")][-1].split()[1]) / 1024
            hypotheses = result.pop("hypotheses")
            result["wer"] = error_rate(references, hypotheses, "wer", ["en"] * len(references))
            for group, index in groups.items():
                result[f"{group}_wall_s"] = sum(result["file_s"][i] for i in index)
                result[f"{group}_wer"] = error_rate([references[i] for i in index], [hypotheses[i] for i in index],
                                                    "wer", ["en"] * len(index))
            results[name] = result
            print(f"{name}: {result['wall_s']:.1f} s", file=sys.stderr)

    rows = [[n, f"{r['wall_s']:.1f}", f"{r['wall_s'] / seconds:.3f}", f"{r['peak_mb']:.0f}", r["wer"],
             f"{r['clips_wall_s']:.1f}", r["clips_wer"], f"{r['long_wall_s']:.1f}", r["long_wer"]]
            for n, r in results.items()]
    clip_seconds = sum(durations[i] for i in groups["clips"])
    print(f"\n{len(items)} files, {seconds:.0f} s of audio ({len(groups['clips'])} clips, {clip_seconds:.0f} s; "
          f"{len(groups['long'])} long files, {seconds - clip_seconds:.0f} s); "
          f"{machine()}")
    print(format_table(["system", "wall s", "RTF", "peak MB", "WER", "clips s", "clips WER", "long s", "long WER"],
                       rows))
    ratios = {}
    for ours, theirs in [("whisper-lora transformers @auto", "whisper-lora transformers"),
                         ("whisper-lora ct2 int8 @auto", "whisper-lora ct2 int8"),
                         ("whisper-lora ct2 float32", "faster-whisper float32"), ("whisper-lora ct2 int8", "faster-whisper int8"),
                         ("whisper-lora transformers", "transformers pipeline"),
                         ("whisper-lora transformers vad", "transformers pipeline"),
                         ("whisper-lora transformers", "transformers pipeline ts")]:
        if ours in results and theirs in results:
            for part in ("", "clips_", "long_"):
                key = f"{ours} / {theirs}" + (f" ({part[:-1]})" if part else "")
                ratios[key] = results[ours][f"{part}wall_s"] / results[theirs][f"{part}wall_s"]
            print(f"time ratio {ours} / {theirs}: {ratios[f'{ours} / {theirs}']:.2f}x "
                  f"(clips {ratios[f'{ours} / {theirs} (clips)']:.2f}x, long files {ratios[f'{ours} / {theirs} (long)']:.2f}x)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"audio_seconds": seconds, "files": len(items), "cpu_count": os.cpu_count(),
                                          "machine": f"{machine()}, systems on CPU",
                                          "repeat": args.repeat, "model": args.model, "results": results, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
