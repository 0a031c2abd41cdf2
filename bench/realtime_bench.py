"""Realtime streaming: latency per word, accuracy against offline decoding, real-time factor, and a soak.

    python bench/realtime_bench.py                 # prints the tables, writes bench/results/realtime_<host>.json
    python bench/realtime_bench.py --soak-minutes 5
    python bench/realtime_bench.py --models base --soak-minutes 0    # the base model's streams only

Streams long real speech through the streaming core (`StreamingTranscriber` over the service and its
batcher, as `serve` runs it) at real-time speed, with computation counted: audio arrives in 100 ms
pieces on the wall clock whatever the decoder is doing, and what arrived while a decode ran is fed at
once. The speech: the two ~98 s files of the inference benchmark (CMU ARCTIC and card recordings of
demo/data/speech-en in random order with pauses), and their 196 s concatenation.

Per-word latency = the moment a word is confirmed - the moment it ended in the audio, where word end
times come from offline word timestamps of the same audio (matched word for word). Reported: p50/p95
latency, WER against the references and against offline transcription of the same audio, the
real-time factor (decoding time / audio time), for the base model and for a LoRA adapter (r=32 on
q/v, small random weights: the adapter's compute, the base model's words).

Soak: a stream of `--soak-minutes` of speech and silence fed 3 s at a time as fast as it is decoded: resident memory
and time per decode sampled along it must stay flat; then 60 s of silence and 60 s of noise, which
must produce no text.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import platform
import queue
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
CHUNK = 0.1  # s of audio per piece, as a microphone delivers it


def rss_mb() -> float:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) / 1024


def make_stream(service, model: str | None, policy: str = "alignatt", audio_ctx: str | None = None):
    from whisper_lora.streaming import StreamOptions

    return service.open_stream(model, "en", options=StreamOptions(policy=policy, audio_ctx=audio_ctx))


def stream_realtime(service, model: str | None, audio: np.ndarray, speed: float = 1.0, policy: str = "alignatt",
                    audio_ctx: str | None = None) -> dict:
    """Feed `audio` on the wall clock (times `speed`); returns confirmed words with the wall time of their
    confirmation (in audio seconds since the stream began), and the transcripts."""
    from whisper_lora.streaming import Confirmed, SpeechStopped

    stream = make_stream(service, model, policy, audio_ctx)
    pieces: queue.Queue = queue.Queue()
    size = int(CHUNK * 16000)
    started = time.monotonic()

    def feeder():
        for n, first in enumerate(range(0, len(audio), size)):
            delay = started + n * CHUNK / speed - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            pieces.put(audio[first:first + size])
        pieces.put(None)

    threading.Thread(target=feeder, daemon=True).start()
    confirmed, texts, ended = [], [], False
    while not ended:
        batch = [pieces.get()]
        while not pieces.empty():
            batch.append(pieces.get())
        ended = batch[-1] is None
        chunk = [b for b in batch if b is not None]
        events = stream.feed(np.concatenate(chunk)) if chunk else []
        if ended:
            events += stream.commit()
        now = (time.monotonic() - started) * speed
        for event in events:
            if isinstance(event, Confirmed):
                confirmed += [(w, now) for w in event.segment.words]
            elif isinstance(event, SpeechStopped):
                texts.append(event.text)
    wall = time.monotonic() - started
    return {"confirmed": confirmed, "text": " ".join(t for t in texts if t), "decode_s": stream.decode_seconds,
            "decodes": stream.decodes, "wall_s": wall, "audio_s": len(audio) / 16000,
            "behind_s": wall - len(audio) / 16000 / speed}


def offline_words(service, model: str | None, audio: np.ndarray):
    from whisper_lora.decode import DecodeOptions

    segments, _ = service.transcribe(audio, model, "en", DecodeOptions(word_timestamps=True))
    segments = list(segments)
    return [w for s in segments for w in s.words or []], " ".join(s.text for s in segments)


def key(word: str) -> str:
    return word.strip().lower().strip(".,!?;:")


def latencies(confirmed, reference_words) -> list[float]:
    """Confirmation time - end in the audio, for the streamed words matched to offline ones."""
    ours, theirs = [key(w.word) for w, _ in confirmed], [key(w.word) for w in reference_words]
    out = []
    for block in difflib.SequenceMatcher(a=ours, b=theirs, autojunk=False).get_matching_blocks():
        for k in range(block.size):
            out.append(confirmed[block.a + k][1] - reference_words[block.b + k].end)
    return out


PEERS = {"whisperlivekit-simulstreaming": "simulstreaming", "whisperlivekit-localagreement": "localagreement"}
PEER_DIR = REPO / "bench" / "peers" / "whisperlivekit"


def peer_stream(peer: str, wav: Path, work: Path, threads: int) -> dict:
    """WhisperLiveKit on the same file at the same pace (its own virtualenv, the same whisper-base weights;
    bench/peers/whisperlivekit): confirmed words with the wall time each final word first appeared in its
    committed text, measured from the stream's start as ours are."""
    import subprocess
    from types import SimpleNamespace

    subprocess.run(["bash", str(PEER_DIR / "setup.sh")], check=True, stdout=subprocess.DEVNULL)
    out = work / f"{peer}-{wav.stem}.json"
    python = REPO / "bench" / ".peers" / "whisperlivekit" / "venv" / "bin" / "python"
    subprocess.run([str(python), str(PEER_DIR / "driver.py"), "--policy", PEERS[peer], "--wav", str(wav),
                    "--out", str(out), "--language", "en", "--threads", str(threads)], check=True,
                   stdout=subprocess.DEVNULL)
    run = json.loads(out.read_text())
    return {"confirmed": [(SimpleNamespace(word=w["word"]), w["first_seen_s"]) for w in run["words"]],
            "text": run["final_text"], "decode_s": run["asr_time_s"], "decodes": run["n_asr_calls"],
            "wall_s": run["wall_s"], "audio_s": run["audio_s"], "behind_s": run["wall_s"] - run["audio_s"],
            "version": run["version"], "settings": run["settings"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--soak-minutes", type=float, default=30.0, help="0: no soak, no silence and noise runs")
    parser.add_argument("--models", nargs="+", default=["base", "adapter"], choices=("base", "adapter"))
    parser.add_argument("--streams", nargs="+", default=["alignatt/auto", "alignatt/full", "local-agreement/full"],
                        help="POLICY/AUDIO_CTX of each stream (the policies and --audio-ctx values of realtime)")
    parser.add_argument("--files", nargs="+", default=["long_0", "long_1", "long_0+1"], choices=("long_0", "long_1", "long_0+1"))
    parser.add_argument("--peers", nargs="*", default=list(PEERS), choices=list(PEERS),
                        help="WhisperLiveKit's policies on the same files, in its own virtualenv (none: ours only)")
    parser.add_argument("--peer-threads", type=int, default=os.cpu_count(),
                        help="the peers' compute threads (CTranslate2 and torch; ours use torch's default, one per "
                             "core); CTranslate2 alone would start 4 on two cores")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / f"realtime_{platform.node()}.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import soundfile as sf
    from infer_bench import build_corpus
    from serve_bench import make_adapters

    from whisper_lora.config import ServeConfig
    from whisper_lora.serve.service import ModelPool, TranscriptionService
    from whisper_lora.text import error_rate

    work = Path(tempfile.mkdtemp(prefix="realtime-bench-"))
    items = build_corpus(work)
    long_files = [(p, t) for p, t in items if str(p).startswith(str(work))]
    audio = {Path(p).stem: sf.read(p, dtype="float32")[0] for p, _ in long_files}
    references = {Path(p).stem: t for p, t in long_files}
    audio["long_0+1"] = np.concatenate([audio["long_0"], audio["long_1"]])
    references["long_0+1"] = references["long_0"] + " " + references["long_1"]
    make_adapters(work / "adapters")
    service = TranscriptionService(ModelPool(None, str(work / "adapters")), max_wait=ServeConfig.batch_wait_ms / 1000)
    rows, results = [], {}
    for model in [{"base": None, "adapter": "alpha"}[m] for m in args.models]:
        for name, setting in ((n, s) for n in args.files for s in args.streams):
            policy, audio_ctx = setting.split("/")
            offline, offline_text = offline_words(service, model, audio[name])
            run = stream_realtime(service, model, audio[name], policy=policy, audio_ctx=audio_ctx)
            lat = latencies(run["confirmed"], offline)
            row = {"model": model or "base", "policy": policy, "audio_ctx": audio_ctx, "file": name,
                   "audio_s": round(run["audio_s"], 1),
                   "p50_latency_s": round(float(np.percentile(lat, 50)), 2),
                   "p95_latency_s": round(float(np.percentile(lat, 95)), 2),
                   "wer_stream": round(error_rate([references[name]], [run["text"]], "wer", ["en"]) * 100, 2),
                   "wer_offline": round(error_rate([references[name]], [offline_text], "wer", ["en"]) * 100, 2),
                   "rtf": round(run["decode_s"] / run["audio_s"], 3), "decodes": run["decodes"],
                   "finished_after_audio_s": round(run["behind_s"], 2), "words_matched": len(lat)}
            rows.append(row)
            print(row, flush=True)
    for name, peer in ((n, p) for n in args.files for p in args.peers):
        wav = work / f"{name}.wav"
        if not wav.exists():
            sf.write(wav, audio[name], 16000)
        offline, offline_text = offline_words(service, None, audio[name])
        run = peer_stream(peer, wav, work, args.peer_threads)
        lat = latencies(run["confirmed"], offline)
        row = {"model": "base", "policy": f"WhisperLiveKit {run['version']} {PEERS[peer]}", "audio_ctx": "full",
               "file": name, "audio_s": round(run["audio_s"], 1),
               "p50_latency_s": round(float(np.percentile(lat, 50)), 2),
               "p95_latency_s": round(float(np.percentile(lat, 95)), 2),
               "wer_stream": round(error_rate([references[name]], [run["text"]], "wer", ["en"]) * 100, 2),
               "wer_offline": round(error_rate([references[name]], [offline_text], "wer", ["en"]) * 100, 2),
               "rtf": round(run["decode_s"] / run["audio_s"], 3), "decodes": run["decodes"],
               "finished_after_audio_s": round(run["behind_s"], 2), "words_matched": len(lat),
               "peer_settings": run["settings"]}
        rows.append(row)
        print({k: v for k, v in row.items() if k != "peer_settings"}, flush=True)
    results["streams"] = rows

    # ---- soak: speech and pauses for --soak-minutes, as fast as it is decoded; then silence and noise
    if not args.soak_minutes:
        service.close()
        report(rows, None, None)
        save(args.out, results)
        return
    rng = np.random.default_rng(0)
    pause = np.zeros(16000 * 10, np.float32)
    soak = []
    while sum(len(a) for a in soak) < args.soak_minutes * 60 * 16000:
        soak += [audio["long_0"] if rng.random() < 0.5 else audio["long_1"], pause]
    soak_audio = np.concatenate(soak)[: int(args.soak_minutes * 60 * 16000)]
    from whisper_lora.streaming import Confirmed

    policy, audio_ctx = args.streams[0].split("/")  # the soak and the quiet runs: the first setting
    stream = make_stream(service, None, policy, audio_ctx)
    samples, size, minute = [], int(CHUNK * 16000) * 30, 0  # fed 3 s at a time: a decode per 3 s, ~2x real time
    decode_marks = []
    for first in range(0, len(soak_audio), size):
        before = (stream.decode_seconds, stream.decodes)
        stream.feed(soak_audio[first:first + size])
        if stream.decodes > before[1]:
            decode_marks.append((first / 16000, (stream.decode_seconds - before[0]) / (stream.decodes - before[1])))
        if first / 16000 >= minute * 60:
            samples.append({"stream_min": minute, "rss_mb": round(rss_mb()), "buffer_s": round(len(stream.buffer) / 16000, 1)})
            minute += 1
    stream.commit()
    per_decode = np.array(decode_marks)
    tenth = max(1, len(per_decode) // 10)
    results["soak"] = {"minutes": args.soak_minutes, "stream": args.streams[0], "memory": samples,
                       "rss_first_mb": samples[1]["rss_mb"] if len(samples) > 1 else samples[0]["rss_mb"],
                       "rss_last_mb": samples[-1]["rss_mb"],
                       "decode_s_first_tenth": round(float(per_decode[:tenth, 1].mean()), 3),
                       "decode_s_last_tenth": round(float(per_decode[-tenth:, 1].mean()), 3),
                       "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    quiet = {}
    for name, signal in (("silence", np.zeros(16000 * 60, np.float32)),
                         ("noise", (rng.standard_normal(16000 * 60) * 0.03).astype(np.float32))):
        stream = make_stream(service, None, policy, audio_ctx)
        events = []
        for first in range(0, len(signal), 1600):
            events += stream.feed(signal[first:first + 1600])
        events += stream.commit()
        quiet[name] = {"confirmed_words": sum(len(e.segment.words) for e in events if isinstance(e, Confirmed)),
                       "decodes": stream.decodes}
    results["quiet"] = quiet
    service.close()

    report(rows, results["soak"], quiet)
    save(args.out, results)


def save(out: Path, results: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    from whisper_lora.report import machine

    out.write_text(json.dumps({"machine": machine(), "cpus": os.cpu_count(), **results}, indent=2))


def report(rows: list[dict], soak: dict | None, quiet: dict | None) -> None:
    from whisper_lora.report import machine

    print(f"\nstreaming at real-time speed; {machine()}\n")
    print("| model | policy | encoder context | audio | p50 latency | p95 latency | WER stream | WER offline | RTF "
          "| done after audio end |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['policy']} | {r['audio_ctx']} | {r['file']} ({r['audio_s']:.0f} s) "
              f"| {r['p50_latency_s']:.2f} s | {r['p95_latency_s']:.2f} s "
              f"| {r['wer_stream']:.2f}% | {r['wer_offline']:.2f}% | {r['rtf']:.2f} | {r['finished_after_audio_s']:.1f} s |")
    if soak is None:
        return
    s = soak
    print(f"\nsoak, {s['minutes']:.0f} min of speech and pauses: resident memory {s['rss_first_mb']} MB after 1 min, "
          f"{s['rss_last_mb']} MB at the end; time per decode {s['decode_s_first_tenth']:.2f} s in the first tenth, "
          f"{s['decode_s_last_tenth']:.2f} s in the last")
    print(f"60 s of silence: {quiet['silence']['confirmed_words']} words ({quiet['silence']['decodes']} decodes); "
          f"60 s of noise: {quiet['noise']['confirmed_words']} words ({quiet['noise']['decodes']} decodes)")


if __name__ == "__main__":
    main()
