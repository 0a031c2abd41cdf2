"""`whisper-lora realtime`: live transcription from the microphone or a file, here or on a server.

Audio comes from the microphone (sounddevice) or from `--file`, fed at real-time speed (`--speed N`
for N times faster); it is transcribed in this process (`--model`, any model or adapter folder) or by
a running `whisper-lora serve` (`--server URL`, over OpenAI's realtime protocol). Confirmed text is
printed as it comes, the partial text redrawn after it on the same line; each utterance ends its line.
`--output` writes the confirmed segments as SRT, VTT or JSON at the end.
"""
from __future__ import annotations

import json
import queue
import sys
import threading
import time
from pathlib import Path

import numpy as np

from ..config import RealtimeConfig
from ..constants import SAMPLE_RATE
from ..decode import Segment, TranscriptionInfo
from ..errors import UserError
from ..manifest import language_code
from ..rundir import save_config_beside
from ..writers import WRITERS

CHUNK_SECONDS = 0.1  # audio handed on at a time, as a microphone callback delivers it
END = None  # queue marker: the source is exhausted


class Printer:
    """Confirmed text stays; the partial text after it is redrawn in place (on a terminal)."""

    def __init__(self, out=sys.stdout):
        self.out, self.tty = out, out.isatty()
        self.line, self.partial = "", ""

    def _draw(self) -> None:
        if self.tty:
            self.out.write("\r\033[K" + self.line + (f"\033[2m{self.partial}\033[0m" if self.partial else ""))
            self.out.flush()

    def confirmed(self, delta: str) -> None:
        self.line += delta
        self.partial = ""
        self._draw()

    def partial_text(self, text: str) -> None:
        self.partial = (" " if self.line and text else "") + text
        self._draw()

    def end_utterance(self, text: str) -> None:
        if self.tty:
            self.out.write("\r\033[K" + text + "\n")
        else:
            self.out.write(text + "\n")
        self.out.flush()
        self.line, self.partial = "", ""


FINAL_QUIET_LIMIT = 120.0  # s: a server that went this quiet after the final commit is given up on


def file_source(path: str, speed: float, chunks: queue.Queue, stop: threading.Event) -> None:
    """Push the file's audio in 100 ms pieces on the audio clock (times `speed`)."""
    from ..audio import load_audio

    audio = load_audio(path)
    size = int(CHUNK_SECONDS * SAMPLE_RATE)
    started = time.monotonic()
    for n, first in enumerate(range(0, len(audio), size)):
        if stop.is_set():
            break
        delay = started + n * CHUNK_SECONDS / speed - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        chunks.put(audio[first:first + size])
    chunks.put(END)


def open_microphone(device, chunks: queue.Queue):
    """A started input stream whose 100 ms blocks go to `chunks` (errors here, in the main thread)."""
    try:
        import sounddevice as sd
    except (ImportError, OSError) as exc:  # OSError: the PortAudio library is missing
        raise UserError(f"the microphone needs sounddevice and PortAudio ({exc}): pip install "
                        "'whisper-lora[realtime]' and, on Debian/Ubuntu, apt-get install libportaudio2") from None

    def callback(indata, frames, when, status):
        chunks.put(indata[:, 0].copy())

    try:
        stream = sd.InputStream(samplerate=SAMPLE_RATE, channels=1, dtype="float32", device=device,
                                blocksize=int(CHUNK_SECONDS * SAMPLE_RATE), callback=callback)
        stream.start()
    except (sd.PortAudioError, ValueError) as exc:
        raise UserError(f"cannot open the microphone: {exc}") from None
    return stream


def _drain(chunks: queue.Queue) -> tuple[np.ndarray | None, bool]:
    """Everything queued now (waiting for the first piece): the audio, and whether the source ended."""
    pieces, ended = [], False
    first = chunks.get()
    while True:
        if first is END:
            ended = True
            break
        pieces.append(first)
        try:
            first = chunks.get_nowait()
        except queue.Empty:
            break
    return (np.concatenate(pieces) if pieces else None), ended


def run_local(config: RealtimeConfig, chunks: queue.Queue, printer: Printer, language: str | None) -> list[Segment]:
    from ..decode import load_backend
    from ..audio_ctx import STREAM_DEFAULT, parse_audio_ctx
    from ..streaming import Confirmed, Partial, SpeechStopped, StreamingTranscriber, StreamOptions

    backend = load_backend(config.model, device=config.device, dtype=config.dtype)

    def decode(audio, options):
        return list(backend.transcribe(audio, language, options)[0])

    def step(audio, options, final, start):
        return backend.stream_step(audio, language, options, final, start)

    policy = config.policy if hasattr(backend, "stream_step") else "local-agreement"  # CTranslate2: no attention
    stream = StreamingTranscriber(decode, language, config.prompt,
                                  StreamOptions(audio_ctx=parse_audio_ctx(config.audio_ctx) or backend.model_audio_ctx
                                                or STREAM_DEFAULT, policy=policy),
                                  step=step)
    segments: list[Segment] = []
    while True:
        audio, ended = _drain(chunks)
        events = stream.feed(audio) if audio is not None else []
        if ended:
            events += stream.commit()
        for event in events:
            if isinstance(event, Confirmed):
                printer.confirmed(event.delta if printer.line else event.delta.lstrip())
            elif isinstance(event, Partial):
                printer.partial_text(event.text)
            elif isinstance(event, SpeechStopped):
                printer.end_utterance(event.text)
                segments += event.segments
        if ended:
            return segments


def _websocket_url(server: str, model: str | None) -> str:
    from urllib.parse import urlencode, urlparse

    url = urlparse(server if "://" in server else "http://" + server)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(url.scheme)
    if scheme is None or not url.netloc:
        raise UserError(f"--server must be a URL like http://127.0.0.1:8000, got {server!r}")
    query = {"intent": "transcription", **({"model": model} if model else {})}
    return f"{scheme}://{url.netloc}{url.path.rstrip('/').removesuffix('/v1')}/v1/realtime?{urlencode(query)}"


def run_remote(config: RealtimeConfig, chunks: queue.Queue, printer: Printer, language: str | None) -> list[Segment]:
    """The same over OpenAI's realtime protocol: audio as base64 PCM16 events, transcripts back as events."""
    import base64

    try:
        from websockets.exceptions import ConnectionClosed, InvalidHandshake
        from websockets.sync.client import connect
    except ImportError:
        raise UserError("--server needs the websockets package: pip install 'whisper-lora[realtime]'") from None
    url = _websocket_url(config.server, config.model)
    import os

    key = config.api_key or os.environ.get("WHISPER_LORA_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        ws = connect(url, additional_headers=headers, open_timeout=30, max_size=None)
    except (OSError, InvalidHandshake) as exc:
        raise UserError(f"cannot reach the realtime endpoint {url} ({exc})") from None
    transcription = {"model": config.model or "whisper-1", "language": language, "prompt": config.prompt or ""}
    ws.send(json.dumps({"type": "session.update", "session": {
        "type": "transcription", "include": ["item.input_audio_transcription.partial"],
        "audio": {"input": {"format": {"type": "audio/pcm", "rate": SAMPLE_RATE}, "transcription": transcription}}}}))
    finished = threading.Event()

    def send_audio():
        try:
            while True:
                audio, ended = _drain(chunks)
                if audio is not None:
                    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
                    ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()}))
                if ended:
                    ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
                    # The protocol does not say which `completed` answers a client's commit (VAD commits
                    # look the same), so a clear follows it: a server that handles events in order
                    # answers `cleared` only once everything before it is transcribed and sent.
                    ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
                    finished.set()
                    return
        except ConnectionClosed:
            finished.set()

    sender = threading.Thread(target=send_audio, daemon=True)
    sender.start()
    segments: list[Segment] = []
    starts: dict[str, float] = {}
    open_items: set[str] = set()
    drained = False  # the clear after the final commit was answered
    try:
        while not (drained and not open_items):  # a server that transcribes out of order: its open items too
            try:
                event = json.loads(ws.recv(timeout=FINAL_QUIET_LIMIT if finished.is_set() else None))
            except TimeoutError:  # what came is kept and written
                print(f"whisper-lora: warning: the server sent nothing for {FINAL_QUIET_LIMIT:.0f} s after the audio "
                      f"ended; the transcript may lack its end", file=sys.stderr)
                break
            kind = event.get("type")
            if kind == "error":
                error = event["error"]
                if error.get("code") == "input_audio_buffer_commit_empty":
                    break  # the stream ended in silence: nothing left to transcribe
                raise UserError(f"the server refused: {error.get('message')}")
            if kind == "input_audio_buffer.cleared":  # the only clear sent is the one after the final commit
                drained = True
            elif kind == "input_audio_buffer.speech_started":
                open_items.add(event["item_id"])
                starts[event["item_id"]] = event["audio_start_ms"] / 1000
            elif kind == "conversation.item.input_audio_transcription.delta":
                printer.confirmed(event["delta"])
            elif kind == "conversation.item.input_audio_transcription.partial":
                printer.partial_text(event["text"])
            elif kind == "input_audio_buffer.speech_stopped":
                starts[event["item_id"], "end"] = event["audio_end_ms"] / 1000
            elif kind == "conversation.item.input_audio_transcription.completed":
                item = event["item_id"]
                open_items.discard(item)
                printer.end_utterance(event["transcript"])
                segments.append(Segment(len(segments), starts.get(item, 0.0), starts.get((item, "end"), 0.0),
                                        event["transcript"]))
    except ConnectionClosed:
        pass
    finally:
        ws.close()
    return segments


def write_output(path: Path, segments: list[Segment]) -> None:
    fmt = {".srt": "srt", ".vtt": "vtt", ".json": "json", ".txt": "txt"}.get(path.suffix.lower())
    if fmt is None:
        raise UserError("--output must end in .srt, .vtt, .json or .txt", path)
    text = " ".join(s.text for s in segments).strip()
    info = TranscriptionInfo(None, None, max((s.end for s in segments), default=0.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        WRITERS[fmt](segments, info, text, out)


def run(config: RealtimeConfig) -> int:
    import signal

    # ---- set up
    language = language_code(config.language, "--language") if config.language else None
    if config.file and not Path(config.file).is_file():
        raise UserError("audio file not found", config.file)
    if config.output and Path(config.output).suffix.lower() not in (".srt", ".vtt", ".json", ".txt"):
        raise UserError("--output must end in .srt, .vtt, .json or .txt", config.output)
    chunks: queue.Queue = queue.Queue()
    stop = threading.Event()
    microphone = None
    if config.file:
        threading.Thread(target=file_source, args=(config.file, config.speed, chunks, stop), daemon=True).start()
    else:
        microphone = open_microphone(config.input_device, chunks)
        print("listening; Ctrl-C ends (the last utterance is finished first)", file=sys.stderr)

        def finish(*_):  # the first Ctrl-C ends the stream cleanly, a second one at once
            signal.signal(signal.SIGINT, signal.default_int_handler)
            microphone.stop()
            chunks.put(END)

        signal.signal(signal.SIGINT, finish)

    # ---- loop
    try:
        segments = (run_remote if config.server else run_local)(config, chunks, Printer(), language)
    finally:
        stop.set()
        if microphone is not None:
            microphone.close()

    # ---- save
    if config.output:
        write_output(Path(config.output), segments)
        save_config_beside(config, config.output)
    return 0
