#!/usr/bin/env python
"""Stream a 16 kHz mono WAV through WhisperLiveKit (in-process, no web server) at real-time pace and record,
for every word of the final committed transcript, when it first appeared as committed text.

    bench/.peers/whisperlivekit/venv/bin/python bench/peers/whisperlivekit/driver.py --policy simulstreaming --wav X.wav --out ss.json
    bench/.peers/whisperlivekit/venv/bin/python bench/peers/whisperlivekit/driver.py --policy localagreement --wav X.wav --out la.json

(bench/peers/whisperlivekit/setup.sh builds the virtualenv and the models first; bench/realtime_bench.py
--peers runs both.)

What runs: exactly what `wlk`/`whisperlivekit-server --pcm-input` runs per WebSocket session:
TranscriptionEngine(config) + AudioProcessor(transcription_engine=..., pcm_input=True); raw s16le PCM goes
to AudioProcessor.process_audio(bytes) and results are read from the async generator returned by
create_tasks() (the FrontData objects the server sends as JSON on /asr). b"" ends the stream.

"Committed" = the text of FrontData.lines (joined, as whisperlivekit.test_harness.TestState.committed_text
does). Each line is a Segment built from AudioProcessor.state.tokens, i.e. the tokens the online processor
*returned* from process_iter()/start_silence()/finish(): LocalAgreement's HypothesisBuffer.flush() (longest
common prefix of two consecutive hypotheses) or SimulStreaming's AlignAtt output after its stability
filter. Those are never retracted. FrontData.buffer_transcription is the tentative tail (LocalAgreement's
unconfirmed hypothesis; SimulStreaming's is empty except with language=auto) and is ignored here.
At end of stream, LocalAgreement's finish() promotes its remaining buffer to committed tokens, and
SimulStreaming runs a last process_iter(is_last=True); those words get first_seen_s near wall_s.

Models (all local, built by setup.sh under bench/.peers/whisperlivekit):
  simulstreaming: decoder = bench/.peers/whisperlivekit/models/whisper-base-openai/base.pt (openai format, converted),
                  encoder = bench/.peers/whisperlivekit/models/faster-whisper-base (CTranslate2; WLK's default "fast encoder"
                  on Linux when faster-whisper is installed), alignment heads = openai's 'base' heads.
  localagreement: faster-whisper backend on bench/.peers/whisperlivekit/models/faster-whisper-base (or, with
                  --la-from-hf-cache, model "base" -> Systran/faster-whisper-base from HF_HOME=bench/.peers/whisperlivekit/hf_home).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[2] / ".peers" / "whisperlivekit"  # what setup.sh built (git ignores it)
MODELS = HERE / "models"
SS_DECODER = MODELS / "whisper-base-openai" / "base.pt"
CT2_DIR = MODELS / "faster-whisper-base"
DEFAULT_WARMUP = HERE / "data" / "warmup.wav"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", required=True, choices=("simulstreaming", "localagreement"))
    p.add_argument("--wav", required=True, type=Path, help="16 kHz mono WAV (other rates are refused)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--chunk-ms", type=float, default=100.0, help="audio per process_audio() call (default 100)")
    p.add_argument("--send-at", choices=("chunk-start", "chunk-end"), default="chunk-start",
                   help="chunk n is sent at wall time n*chunk (chunk-start, as bench/realtime_bench.py "
                        "feeds) or (n+1)*chunk (chunk-end, as a microphone delivers it). Default chunk-start.")
    p.add_argument("--speed", type=float, default=1.0, help="feeding speed multiple of real time (default 1)")
    p.add_argument("--language", default="en")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS / torch threads / CTranslate2 threads (default: libraries' defaults)")
    p.add_argument("--warmup-file", default=str(DEFAULT_WARMUP),
                   help="local WAV for WLK's model warm-up ('' = skip). WLK's default would download jfk.wav.")
    p.add_argument("--no-vac", action="store_true", help="disable WLK's Silero voice-activity controller "
                   "(default: on, as in WLK)")
    p.add_argument("--la-from-hf-cache", action="store_true",
                   help="localagreement: load model 'base' through the HF cache (HF_HOME) instead of the folder")
    p.add_argument("--config", action="append", default=[], metavar="KEY=JSON",
                   help="extra WhisperLiveKitConfig field, e.g. --config frame_threshold=25 (value parsed as JSON)")
    p.add_argument("--timeout", type=float, default=None, help="give up after this many s (default 3*audio+120)")
    p.add_argument("--trace", action="store_true", help="also store every FrontData update (time, lines, buffer)")
    p.add_argument("--log-level", default="WARNING")
    return p.parse_args()


ARGS = parse_args()

# ---- environment, before any heavy import ---------------------------------------------------------------
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", str(HERE / "hf_home"))
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
if ARGS.threads:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)

# ---- network guard: every attempt is refused and recorded --------------------------------------------
import socket  # noqa: E402

NETWORK_ATTEMPTS: list[str] = []
_orig_connect, _orig_connect_ex, _orig_getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo


def _allowed(sock) -> bool:
    return sock.family == getattr(socket, "AF_UNIX", -1)


def _guard_connect(self, address):
    if _allowed(self):
        return _orig_connect(self, address)
    NETWORK_ATTEMPTS.append(f"connect {address!r}")
    raise OSError("network disabled by driver.py")


def _guard_connect_ex(self, address):
    if _allowed(self):
        return _orig_connect_ex(self, address)
    NETWORK_ATTEMPTS.append(f"connect_ex {address!r}")
    raise OSError("network disabled by driver.py")


def _guard_getaddrinfo(host, *a, **k):
    if host in (None, "localhost", "127.0.0.1", "::1"):
        return _orig_getaddrinfo(host, *a, **k)
    NETWORK_ATTEMPTS.append(f"getaddrinfo {host!r}")
    raise socket.gaierror("network disabled by driver.py")


socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = _guard_connect, _guard_connect_ex, _guard_getaddrinfo

import asyncio  # noqa: E402
import logging  # noqa: E402
from importlib.metadata import version as pkg_version  # noqa: E402

import soundfile as sf  # noqa: E402

if ARGS.threads:
    import torch

    torch.set_num_threads(ARGS.threads)
    torch.set_num_interop_threads(1)

from whisperlivekit import AudioProcessor, TranscriptionEngine, WhisperLiveKitConfig  # noqa: E402


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record):
        msg = f"{record.levelname} {record.name}: {record.getMessage()}"
        if msg not in self.records:
            self.records.append(msg[:500])


LOG = _Collect()


def quiet_logging(level: str) -> None:
    lvl = getattr(logging, level.upper())
    logging.getLogger().setLevel(lvl)
    for name in list(logging.root.manager.loggerDict) + ["whisperlivekit", "faster_whisper"]:
        if name.startswith(("whisperlivekit", "faster_whisper")):
            logging.getLogger(name).setLevel(lvl)
    logging.getLogger().addHandler(LOG)


def build_config(args) -> tuple[WhisperLiveKitConfig, dict]:
    kw = dict(
        backend_policy=args.policy,
        backend="auto",  # WLK default: picks faster-whisper on Linux when installed
        model_size="base",
        lan=args.language,
        pcm_input=True,
        vac=not args.no_vac,
        warmup_file=args.warmup_file,
        log_level=args.log_level,
    )
    if args.policy == "simulstreaming":
        heads = (SS_DECODER.parent / "base.pt.alignment_heads.b85").read_text().strip()
        kw.update(decoder_model_path=str(SS_DECODER), encoder_model_path=str(CT2_DIR),
                  custom_alignment_heads=heads)
    elif not args.la_from_hf_cache:
        kw.update(model_dir=str(CT2_DIR))
    for item in args.config:
        key, _, value = item.partition("=")
        kw[key] = json.loads(value)
    cfg = WhisperLiveKitConfig.from_kwargs(**kw)
    return cfg, kw


def norm(word: str) -> str:
    return re.sub(r"[^\w']+", "", word.lower())


class CommittedTracker:
    """Committed words by position (whitespace split of the committed text).

    SimulStreaming commits sub-word tokens, so a word can grow across commits ("sp" -> "spades") and
    punctuation can be glued on later ("degree" -> "degree."). Per position we keep:
      partial_s    first time anything occupied the position (e.g. "sp");
      first_seen_s first time it held the final word up to case/punctuation ("spades", "Spades");
      final_form_s first time it held the exact final string ("spades,").
    A change that is not such a continuation (different word, or words dropped) is a real revision of
    committed text; it is listed in `revisions` and restarts the position's clocks."""

    def __init__(self):
        self.slots: list[dict] = []
        self.revisions: list[dict] = []

    def update(self, words: list[str], t: float) -> None:
        for i, w in enumerate(words):
            if i >= len(self.slots):
                self.slots.append({"word": w, "partial_s": t, "first_seen_s": t, "final_form_s": t})
                continue
            slot = self.slots[i]
            if slot["word"] == w:
                continue
            old, new = norm(slot["word"]), norm(w)
            if old != new:
                if not new.startswith(old):
                    self.revisions.append({"index": i, "from": slot["word"], "to": w, "t": round(t, 3)})
                    slot["partial_s"] = t
                slot["first_seen_s"] = t
            slot["word"], slot["final_form_s"] = w, t
        if len(words) < len(self.slots):
            self.revisions.append({"index": len(words), "dropped": [s["word"] for s in self.slots[len(words):]],
                                   "t": round(t, 3)})
            del self.slots[len(words):]

    def words(self) -> list[dict]:
        out = []
        for s in self.slots:
            w = {"word": s["word"], "first_seen_s": round(s["first_seen_s"], 3)}
            if s["partial_s"] < s["first_seen_s"]:
                w["partial_s"] = round(s["partial_s"], 3)
            if s["final_form_s"] > s["first_seen_s"]:
                w["final_form_s"] = round(s["final_form_s"], 3)
            out.append(w)
        return out


def committed_words(front) -> list[str]:
    return " ".join(line.text for line in front.lines if line.text).split()


async def run(args, cfg) -> dict:
    audio, sr = sf.read(str(args.wav), dtype="int16", always_2d=True)
    if sr != 16000 or audio.shape[1] != 1:
        raise SystemExit(f"{args.wav}: need 16 kHz mono, got {sr} Hz x {audio.shape[1]}")
    pcm = audio[:, 0].tobytes()
    audio_s = len(pcm) / 32000
    chunk_bytes = int(round(args.chunk_ms / 1000 * 16000)) * 2
    chunk_s = chunk_bytes / 32000 / args.speed
    timeout = args.timeout or 3 * audio_s + 120

    t_engine = time.monotonic()
    engine = TranscriptionEngine(config=cfg)
    engine_s = time.monotonic() - t_engine
    processor = AudioProcessor(transcription_engine=engine, pcm_input=True)
    results = await processor.create_tasks()

    tracker = CommittedTracker()
    trace: list[dict] = []
    last = {"front": None}
    t0 = time.monotonic()

    async def consume():
        async for front in results:
            t = time.monotonic() - t0
            last["front"] = front
            tracker.update(committed_words(front), t)
            if args.trace:
                trace.append({"t": round(t, 3), "committed": " ".join(l.text for l in front.lines if l.text),
                              "buffer": front.buffer_transcription, "status": front.status})

    consumer = asyncio.create_task(consume())
    lateness = 0.0
    for n, start in enumerate(range(0, len(pcm), chunk_bytes)):
        due = t0 + (n + (1 if args.send_at == "chunk-end" else 0)) * chunk_s
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            lateness = max(lateness, -delay)
        await processor.process_audio(pcm[start:start + chunk_bytes])
    sent_s = time.monotonic() - t0
    await processor.process_audio(b"")  # end of stream: flush
    try:
        await asyncio.wait_for(consumer, timeout=timeout)
        timed_out = False
    except asyncio.TimeoutError:
        timed_out = True
    wall_s = time.monotonic() - t0
    await processor.cleanup()

    front = last["front"]
    final_words = committed_words(front) if front else []
    words = tracker.words()
    assert [w["word"] for w in words] == final_words
    asr = engine.asr
    return {
        "policy": args.policy,
        "version": pkg_version("whisperlivekit"),
        "versions": {p: pkg_version(p) for p in ("faster-whisper", "ctranslate2", "torch", "onnxruntime")},
        "wav": str(args.wav),
        "words": words,
        "final_text": " ".join(final_words),
        "final_buffer": front.buffer_transcription if front else "",
        "wall_s": round(wall_s, 3),
        "audio_s": round(audio_s, 3),
        "sent_s": round(sent_s, 3),
        "max_send_lateness_s": round(lateness, 3),
        "engine_load_s": round(engine_s, 2),
        "timed_out": timed_out,
        "encoder_backend": getattr(asr, "encoder_backend", None) or getattr(asr, "backend_choice", None),
        "settings": {k: v for k, v in vars(engine.args).items()
                     if k in ("backend_policy", "backend", "model_size", "model_dir", "decoder_model_path",
                              "encoder_model_path", "custom_alignment_heads", "lan", "vac", "vac_chunk_size",
                              "vad", "min_chunk_size", "frame_threshold", "beams", "decoder_type",
                              "audio_max_len", "audio_min_len", "cif_ckpt_path", "never_fire", "init_prompt",
                              "max_context_tokens", "buffer_trimming", "buffer_trimming_sec",
                              "confidence_validation", "asr_coalesce_min_s", "pause_segmentation_seconds",
                              "warmup_file", "disable_fast_encoder")}
        | {"chunk_ms": args.chunk_ms, "send_at": args.send_at, "speed": args.speed, "threads": args.threads,
           "la_beam_size": 5 if args.policy == "localagreement" else None},
        "n_updates": processor.metrics.n_responses_sent,
        "n_asr_calls": processor.metrics.n_transcription_calls,
        "asr_time_s": round(sum(processor.metrics.transcription_durations), 2),
        "revisions": tracker.revisions,
        "network_attempts": NETWORK_ATTEMPTS,
        "log_warnings": LOG.records,
        **({"trace": trace} if args.trace else {}),
    }


def main() -> None:
    quiet_logging(ARGS.log_level)
    cfg, _ = build_config(ARGS)
    result = asyncio.run(run(ARGS, cfg))
    ARGS.out.parent.mkdir(parents=True, exist_ok=True)
    ARGS.out.write_text(json.dumps(result, indent=1, ensure_ascii=False))
    print(f"{result['policy']}: {len(result['words'])} words, wall {result['wall_s']} s for "
          f"{result['audio_s']} s audio, network attempts {len(NETWORK_ATTEMPTS)}, -> {ARGS.out}")
    print("final:", result["final_text"])


if __name__ == "__main__":
    main()
