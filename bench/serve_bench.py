"""Serving throughput: dynamic batching against one request at a time, one adapter against four mixed.

    python bench/serve_bench.py                 # prints the table, writes bench/results/serve_<host>.json
    python bench/serve_bench.py --requests 20   # a shorter run

Each configuration is a real `whisper-lora serve` process on 127.0.0.1 with the embedded whisper-base
and four LoRA adapters (r=32 on q/v of encoder and decoder, as `train` makes them; small random weights,
so every adapter transcribes like the base and the systems decode the same number of tokens). A load
generator sends `--requests` concurrent requests (the official `openai` client, one thread each) of
real speech: the CMU ARCTIC and card recordings of demo/data/speech-en, each file all seven in a
random order with natural pauses, ~24 s (API traffic is recordings, not 3 s words). Every request must succeed. Reported:
audio seconds transcribed per wall second, p50/p95 latency, and the server's peak resident memory.

  one at a time     --max-batch 1: each window decoded alone, as a server without batching does
  batched           --max-batch 8: windows of concurrent requests decoded together
  batched, 1 adapter      every request for the same adapter
  batched, 4 adapters     requests spread over four adapters, mixed in batches (--mixed-adapters: peft adapter_names)
  batched, 4 grouped      the same load batched per adapter (the default: a batch holds one adapter)

`--short`: requests of ~5 s instead (one ARCTIC sentence, or cards joined to at least 4 s: what a
voice assistant or a phone menu sends), at Whisper's 30 s encoder context and at `--audio-ctx auto`:

  one at a time, full / batched, full    the server as it was (every window encoded as 30 s)
  one at a time, auto / batched, auto    the encoder fed the audio plus 1 s, at least 10 s

Memory: the server's resident set after a warm-up request with the base only, then after all four
adapters were used, against base + 4 x adapter file size (+10%).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SPEECH_EN = REPO / "demo" / "data" / "speech-en"
ADAPTERS = ("alpha", "beta", "gamma", "delta")


def make_clips(folder: Path, count: int) -> list[Path]:
    """`count` files of ~24 s: every real recording once, in a random order, with 0.4-1.2 s pauses. (No
    recording twice in a file: repeated sentences read as a repetition loop to the temperature fallback.)"""
    import soundfile as sf

    from whisper_lora.audio import load_audio

    recordings = [load_audio(p) for p in sorted(SPEECH_EN.rglob("*.wav"))]
    rng = np.random.default_rng(0)
    paths = []
    for n in range(count):
        pieces = []
        for index in rng.permutation(len(recordings)):
            pieces += [recordings[index], np.zeros(int(16000 * rng.uniform(0.4, 1.2)), np.float32)]
        paths.append(folder / f"clip_{n:02d}.wav")
        sf.write(paths[-1], np.concatenate(pieces), 16000)
    return paths


def make_short_clips(folder: Path, count: int) -> tuple[list[Path], list[str]]:
    """`count` files of 3-8 s (recordings joined with 0.5 s pauses until at least 4 s) and their texts."""
    import soundfile as sf

    from whisper_lora.audio import load_audio

    texts = {}
    for manifest in SPEECH_EN.rglob("transcripts.json"):
        texts.update({str(manifest.parent / name): text for name, text in json.loads(manifest.read_text()).items()})
    names = sorted(texts)
    recordings = {name: load_audio(name) for name in names}
    rng = np.random.default_rng(1)
    paths, references = [], []
    for n in range(count):
        pieces, said, seconds = [], [], 0.0
        while seconds < 4.0:
            name = names[rng.integers(len(names))]
            if name in said or seconds + len(recordings[name]) / 16000 > 8.0:
                if seconds:
                    break
                continue
            pieces += [recordings[name], np.zeros(8000, np.float32)]
            said.append(name)
            seconds += len(recordings[name]) / 16000 + 0.5
        paths.append(folder / f"short_{n:02d}.wav")
        sf.write(paths[-1], np.concatenate(pieces), 16000)
        references.append(" ".join(texts[name] for name in said))
    return paths, references


def make_adapters(folder: Path) -> float:
    """Four adapters of the embedded model; returns one adapter's weight file size in MB."""
    import torch

    from whisper_lora.lora import apply_lora, save_adapter
    from whisper_lora.models import load_model

    for seed, name in enumerate(ADAPTERS):
        model, processor = load_model(None)
        peft_model = apply_lora(model, 32, 64, 0.0, ["q_proj", "v_proj"])
        torch.manual_seed(seed)
        with torch.no_grad():
            for param_name, param in peft_model.named_parameters():
                if "lora_B" in param_name:
                    param.normal_(0, 1e-3)
        save_adapter(peft_model, processor, folder / name, "default")
    return (folder / ADAPTERS[0] / "adapter_model.safetensors").stat().st_size / 2**20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, adapters: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(Path(tempfile.gettempdir()) / f"serve-bench-{self.port}.log", "w")
        self.process = subprocess.Popen([sys.executable, "-m", "whisper_lora", "serve", "--port", str(self.port),
                                         "--adapters", str(adapters), "--max-queue", "256", *args],
                                        cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"server did not start; see {self.log.name}")

    def rss_mb(self) -> tuple[float, float]:
        """(current, peak) resident memory of the server process."""
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines())
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=120)
        self.log.close()


def load(server: Server, clips: list[Path], models: list[str], timeout: float) -> dict:
    """All requests at once, one thread each; every one must succeed."""
    import openai

    from whisper_lora.audio import audio_duration

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="bench", max_retries=0, timeout=timeout)
    latencies: list[float] = []
    lock = threading.Lock()

    def one(job):
        clip, model = job
        started = time.perf_counter()
        text = client.audio.transcriptions.create(file=open(clip, "rb"), model=model, language="en").text
        with lock:
            latencies.append(time.perf_counter() - started)
        return text

    jobs = list(zip(clips, models))
    started = time.perf_counter()
    with ThreadPoolExecutor(len(jobs)) as pool:
        texts = list(pool.map(one, jobs))
    wall = time.perf_counter() - started
    audio = sum(audio_duration(c) for c in clips)
    return {"requests": len(jobs), "failed": 0, "audio_s": round(audio, 1), "wall_s": round(wall, 1),
            "throughput": round(audio / wall, 3), "p50_s": round(float(np.percentile(latencies, 50)), 2),
            "p95_s": round(float(np.percentile(latencies, 95)), 2), "peak_rss_mb": round(server.rss_mb()[1]),
            "texts": texts}


def run_server(name: str, flags: list[str], adapters: Path, clips: list[Path], models: list[str], timeout: float,
               warm_up=None) -> dict:
    """One configuration: its own server, a warm-up (by default the load's first request alone), the load."""
    server = Server(adapters, *flags)
    try:
        if warm_up is None:
            load(server, clips[:1], models[:1], timeout)  # first-call allocations (and the adapter loaded)
        else:
            warm_up(server)
        print(f"{name}: {len(clips)} requests ...", flush=True)
        return load(server, clips, models, timeout)
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one request may take")
    parser.add_argument("--short", action="store_true", help="~5 s requests at the full and the auto encoder context")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.out = args.out or REPO / "bench" / "results" / f"serve_{platform.node()}{'_short' if args.short else ''}.json"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    if args.short:
        return short_requests(args, work)
    clips = make_clips(work, args.requests)
    adapter_mb = make_adapters(work / "adapters")
    spread = [ADAPTERS[i % len(ADAPTERS)] for i in range(args.requests)]
    runs = [("one at a time", ["--max-batch", "1"], ["whisper-1"] * args.requests),
            ("batched", ["--max-batch", "8"], ["whisper-1"] * args.requests),
            ("batched, 1 adapter", ["--max-batch", "8"], ["alpha"] * args.requests),
            ("batched, 4 adapters mixed", ["--max-batch", "8", "--mixed-adapters"], spread),
            ("batched, 4 adapters grouped", ["--max-batch", "8"], spread)]
    memory = {}

    def weigh_adapters(server: Server) -> None:
        load(server, clips[:1], ["whisper-1"], args.timeout)  # warm-up on the base alone
        memory["base_mb"] = round(server.rss_mb()[0])
        for adapter in ADAPTERS:
            load(server, clips[:1], [adapter], args.timeout)
        memory["four_adapters_mb"] = round(server.rss_mb()[0])

    results = {name: run_server(name, flags, work / "adapters", clips, models, args.timeout,
                                weigh_adapters if name == "batched, 4 adapters mixed" else None)
               for name, flags, models in runs}
    base = results["one at a time"]["throughput"]
    single = results["batched, 1 adapter"]["throughput"]
    print(f"\n{args.requests} concurrent requests, {results['batched']['audio_s']:.0f} s of speech; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores\n")
    print("| system | audio s / wall s | vs one at a time | vs 1 adapter | p50 latency | p95 latency | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['throughput']:.2f} | {r['throughput'] / base:.2f}x | "
              f"{r['throughput'] / single:.2f}x | {r['p50_s']:.1f} s | {r['p95_s']:.1f} s | {r['peak_rss_mb']} MB |")
    memory["adapter_file_mb"] = round(adapter_mb, 1)
    limit = (memory["base_mb"] + 4 * adapter_mb) * 1.1
    memory["limit_mb"] = round(limit)
    print(f"\nresident memory: base alone {memory['base_mb']} MB; with four adapters of {adapter_mb:.1f} MB "
          f"{memory['four_adapters_mb']} MB (+{memory['four_adapters_mb'] - memory['base_mb']} MB; "
          f"limit base + 4 adapters + 10% = {limit:.0f} MB)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": platform.node(), "cpus": os.cpu_count(), "requests": args.requests,
                                    "results": {k: {kk: vv for kk, vv in v.items() if kk != "texts"}
                                                for k, v in results.items()},
                                    "memory": memory}, indent=2))


def short_requests(args, work: Path) -> None:
    from whisper_lora.report import format_table, machine
    from whisper_lora.text import error_rate

    clips, references = make_short_clips(work, args.requests)
    (work / "adapters").mkdir()
    runs = [("one at a time, full", ["--max-batch", "1", "--audio-ctx", "full"]),
            ("batched, full", ["--max-batch", "8", "--audio-ctx", "full"]),
            ("one at a time, auto", ["--max-batch", "1", "--audio-ctx", "auto"]),
            ("batched, auto", ["--max-batch", "8", "--audio-ctx", "auto"])]
    results = {}
    for name, flags in runs:
        results[name] = run_server(name, flags, work / "adapters", clips, ["whisper-1"] * args.requests, args.timeout)
        results[name]["wer"] = error_rate(references, results[name].pop("texts"), "wer", ["en"] * len(clips))
    baseline = results["batched, full"]["throughput"]
    audio = results["batched, full"]["audio_s"]
    print(f"\n{args.requests} concurrent requests of {audio / args.requests:.1f} s on average ({audio:.0f} s of speech); "
          f"{machine()}\n")
    print(format_table(["system", "audio s / wall s", "vs batched, full", "p50 latency", "p95 latency", "WER",
                        "peak RSS"],
                       [[name, f"{r['throughput']:.2f}", f"{r['throughput'] / baseline:.2f}x", f"{r['p50_s']:.1f} s",
                         f"{r['p95_s']:.1f} s", r["wer"], f"{r['peak_rss_mb']} MB"] for name, r in results.items()]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "requests": args.requests, "results": results}, indent=2))


if __name__ == "__main__":
    main()
