"""`/v1/realtime?intent=transcription`: OpenAI's realtime transcription protocol over a WebSocket.

One `StreamingTranscriber` per connection, decoding through the shared service (so concurrent streams
share the batcher and any adapter). Client events: `session.update` (GA) and
`transcription_session.update` (beta), `input_audio_buffer.append` / `.commit` / `.clear`. Server events
per utterance (an "item"): `input_audio_buffer.speech_started`, transcription `delta`s as words are
confirmed (while the speaker goes on), `speech_stopped`, `committed`, the item, and `completed` with
the whole transcript (the deltas, joined). With `"include": ["item.input_audio_transcription.partial"]`
in the session, the not yet confirmed text comes too, as `conversation.item.input_audio_transcription.partial`.
A bad event gets an `error` event and the connection stays open.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import json
import uuid
from dataclasses import dataclass, field

import numpy as np
from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from starlette.concurrency import run_in_threadpool

from ..constants import SAMPLE_RATE
from ..errors import UserError
from ..manifest import language_code
from .errors import APIError
from .service import Busy, UnknownModel
from ..streaming import Confirmed, Partial, SpeechStarted, SpeechStopped, StreamOptions, StreamingTranscriber

DEFAULT_RATE = 24_000  # Hz: what OpenAI's realtime API sends and expects for pcm16
RATES = (16_000, 24_000)
PARTIAL = "item.input_audio_transcription.partial"
BUSY_PATIENCE = 30.0  # s a live decode waits for a free slot before the stream reports the server busy
DEFAULT_TURN = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500}


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


class EventError(Exception):
    def __init__(self, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.code, self.param = code, param


@dataclass
class Session:
    beta: bool  # the client speaks the beta protocol (OpenAI-Beta: realtime=v1)
    model: str = "whisper-1"
    language: str | None = None
    prompt: str | None = None
    rate: int = DEFAULT_RATE
    turn_detection: dict | None = field(default_factory=lambda: dict(DEFAULT_TURN))
    partials: bool = False

    def describe(self) -> dict:
        transcription = {"model": self.model, "language": self.language, "prompt": self.prompt or ""}
        if self.beta:
            return {"object": "realtime.transcription_session", "input_audio_format": "pcm16",
                    "input_audio_transcription": transcription, "turn_detection": self.turn_detection,
                    "client_secret": None, "include": [PARTIAL] if self.partials else []}
        return {"type": "transcription", "object": "realtime.transcription_session",
                "audio": {"input": {"format": {"type": "audio/pcm", "rate": self.rate}, "transcription": transcription,
                                    "turn_detection": self.turn_detection}},
                "include": [PARTIAL] if self.partials else []}

    def update(self, session: dict, languages: set[str]) -> None:
        if not isinstance(session, dict):
            raise EventError("'session' must be an object", "invalid_value", "session")
        if self.beta or "input_audio_transcription" in session or "input_audio_format" in session:
            fmt = session.get("input_audio_format")
            if fmt not in (None, "pcm16"):
                raise EventError(f"input_audio_format must be pcm16, got {fmt!r}", "invalid_value",
                                 "session.input_audio_format")
            transcription = session.get("input_audio_transcription")
            turn = session.get("turn_detection", self.turn_detection) if "turn_detection" in session else self.turn_detection
            rate = session.get("input_audio_rate", self.rate)  # beta has no rate field: 24 kHz, or 16 kHz if said so
        else:
            audio = (session.get("audio") or {}).get("input") or {}
            fmt = audio.get("format") or {}
            if fmt and fmt.get("type", "audio/pcm") != "audio/pcm":
                raise EventError(f"audio.input.format.type must be audio/pcm, got {fmt.get('type')!r}", "invalid_value",
                                 "session.audio.input.format")
            rate = fmt.get("rate", self.rate)
            transcription = audio.get("transcription")
            turn = audio["turn_detection"] if "turn_detection" in audio else self.turn_detection
        if rate not in RATES:
            raise EventError(f"the audio rate must be 24000 or 16000 Hz, got {rate!r}", "invalid_value",
                             "session.audio.input.format.rate")
        if turn is not None and (not isinstance(turn, dict) or turn.get("type", "server_vad") != "server_vad"):
            raise EventError("turn_detection must be server_vad or null (commit by hand)", "invalid_value",
                             "session.turn_detection")
        if transcription is not None:
            if not isinstance(transcription, dict):
                raise EventError("transcription settings must be an object", "invalid_value", "session")
            language = transcription.get("language") or None
            if language is not None:
                try:
                    language = language_code(language, "language")
                except UserError as exc:
                    raise EventError(str(exc), "invalid_value", "session.audio.input.transcription.language") from None
                if language not in languages:
                    raise EventError(f"the model has no language '{language}'", "invalid_value",
                                     "session.audio.input.transcription.language")
        # every check before anything changes: a refused update leaves the session as it was
        noise = session.get("input_audio_noise_reduction") if "input_audio_noise_reduction" in session else \
            ((session.get("audio") or {}).get("input") or {}).get("noise_reduction")
        if noise is not None:
            raise EventError("noise_reduction is not available here (no denoiser runs before the model); set it to "
                             "null", "unsupported", "session.audio.input.noise_reduction")
        include = session.get("include")
        if include is not None and (not isinstance(include, list) or any(item != PARTIAL for item in include)):
            raise EventError(f"include takes [{PARTIAL!r}] here, got {include!r} (token log-probabilities of "
                             "streamed turns are not available)", "unsupported", "session.include")
        if transcription is not None:
            self.model = transcription.get("model") or self.model
            self.language, self.prompt = language, transcription.get("prompt") or None
        if include is not None:
            self.partials = PARTIAL in include
        self.rate, self.turn_detection = rate, turn

    def stream_options(self) -> StreamOptions:
        turn = self.turn_detection
        if turn is None:  # the client commits: an utterance never ends on its own
            return StreamOptions(silence=float("inf"))
        return StreamOptions(threshold=float(turn.get("threshold", 0.5)),
                             prefix_padding=float(turn.get("prefix_padding_ms", 300)) / 1000,
                             silence=float(turn.get("silence_duration_ms", 500)) / 1000)


class Connection:
    """One client: receives events, feeds audio to its stream in order, sends what the stream says."""

    def __init__(self, websocket: WebSocket, service, beta: bool):
        self.ws, self.service = websocket, service
        self.session = Session(beta=beta)
        self.pending: collections.deque = collections.deque()  # ("audio", pcm) | ("commit", id) | ("restart", None)
        self.wake = asyncio.Event()
        self.stream: StreamingTranscriber | None = None
        self.items: dict[int, str] = {}  # utterance number -> item id
        self.previous_item: str | None = None
        self.resampler = None

    # ---- sending --------------------------------------------------------------------------------------

    async def send(self, type_: str, **fields) -> None:
        await self.ws.send_text(json.dumps({"event_id": _id("event"), "type": type_, **fields}, ensure_ascii=False))

    async def error(self, message: str, code: str, param: str | None = None, event_id: str | None = None) -> None:
        await self.send("error", error={"type": "invalid_request_error", "code": code, "message": message,
                                        "param": param, "event_id": event_id})

    async def session_event(self, suffix: str) -> None:
        prefix = "transcription_session" if self.session.beta else "session"
        await self.send(f"{prefix}.{suffix}", session=self.session.describe())

    # ---- the stream -----------------------------------------------------------------------------------

    def _new_stream(self) -> StreamingTranscriber:
        session = self.session
        return self.service.open_stream(session.model, session.language, session.prompt, session.stream_options(),
                                        patience=BUSY_PATIENCE)

    def _pcm(self, data: str) -> np.ndarray:
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError, TypeError):
            raise EventError("'audio' must be base64-encoded 16-bit PCM", "invalid_audio", "audio") from None
        if len(raw) % 2:
            raise EventError("'audio' holds an odd number of bytes: 16-bit PCM has two per sample", "invalid_audio",
                             "audio")
        pcm = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
        if self.session.rate == SAMPLE_RATE:
            return pcm
        if self.resampler is None:
            import soxr

            # one resampler for the whole stream: chunk edges leave no clicks
            self.resampler = soxr.ResampleStream(self.session.rate, SAMPLE_RATE, 1, dtype="float32")
        return self.resampler.resample_chunk(pcm)

    async def translate(self, events) -> None:
        for event in events:
            if isinstance(event, SpeechStarted):
                item = self.items[event.utterance] = _id("item")
                await self.send("input_audio_buffer.speech_started", audio_start_ms=round(event.at * 1000),
                                item_id=item)
            elif isinstance(event, Confirmed):
                await self.send("conversation.item.input_audio_transcription.delta",
                                item_id=self.items[event.utterance], content_index=0, delta=event.delta)
            elif isinstance(event, Partial):
                if self.session.partials:
                    await self.send("conversation.item.input_audio_transcription.partial",
                                    item_id=self.items[event.utterance], content_index=0, text=event.text)
            elif isinstance(event, SpeechStopped):
                item = self.items.pop(event.utterance)
                await self.send("input_audio_buffer.speech_stopped", audio_end_ms=round(event.at * 1000), item_id=item)
                await self.send("input_audio_buffer.committed", item_id=item, previous_item_id=self.previous_item)
                message = {"id": item, "object": "realtime.item", "type": "message", "status": "completed",
                           "role": "user", "content": [{"type": "input_audio", "transcript": event.text}]}
                await self.send("conversation.item.created" if self.session.beta else "conversation.item.added",
                                item=message, previous_item_id=self.previous_item)
                seconds = (event.segments[-1].end - event.segments[0].start) if event.segments else 0.0
                await self.send("conversation.item.input_audio_transcription.completed", item_id=item, content_index=0,
                                transcript=event.text, usage={"type": "duration", "seconds": round(seconds, 3)})
                self.previous_item = item

    def _put(self, kind: str, payload) -> None:
        self.pending.append((kind, payload))
        self.wake.set()

    async def process(self) -> None:
        """Audio and commits in the order they came; audio that arrived while a decode ran is fed at once,
        so the decoding interval follows the machine's speed."""
        while True:
            if not self.pending:
                self.wake.clear()
                await self.wake.wait()
                continue
            kind, payload = self.pending.popleft()
            try:
                if kind == "audio":
                    pieces = [payload]
                    while self.pending and self.pending[0][0] == "audio":
                        pieces.append(self.pending.popleft()[1])
                    if self.stream is None:
                        self.stream = await run_in_threadpool(self._new_stream)
                    await self.translate(await run_in_threadpool(self.stream.hear, np.concatenate(pieces)))
                    events = await run_in_threadpool(self.stream.update)
                elif kind == "commit":
                    if self.stream is None or not self.stream.in_speech:
                        await self.error("no speech in the audio buffer to commit", "input_audio_buffer_commit_empty",
                                         event_id=payload)
                        continue
                    events = await run_in_threadpool(self.stream.commit)
                elif kind == "clear":
                    if self.stream is not None:
                        self.stream.clear()
                    await self.send("input_audio_buffer.cleared")
                    continue
                else:  # new session settings: the utterance under way ends first
                    events = await run_in_threadpool(self.stream.commit) if self.stream is not None else []
                    self.stream, self.resampler = None, None
                await self.translate(events)
            except UnknownModel as exc:  # the adapter's folder went away during the stream
                await self.turn_failed(str(exc), "model_not_found", "session.audio.input.transcription.model")
            except (UserError, Busy) as exc:
                await self.turn_failed(str(exc), "transcription_failed")
            except APIError as exc:  # serve --ray: no model replica could take the step
                await self.turn_failed(exc.message, "transcription_failed")

    async def turn_failed(self, message: str, code: str, param: str | None = None) -> None:
        """OpenAI's `...input_audio_transcription.failed` for the utterance under way (its item is done for;
        the next audio starts a fresh stream); a plain `error` when no utterance was under way."""
        # the stream may be mid-utterance even when no item was announced (a decode that failed in the same
        # call that heard the speech start): it starts afresh either way
        self.stream, self.resampler = None, None
        if not self.items:
            await self.error(message, code, param)
            return
        for item in self.items.values():
            await self.send("conversation.item.input_audio_transcription.failed", item_id=item, content_index=0,
                            error={"type": "transcription_error", "code": code, "message": message, "param": param})
        self.items.clear()

    # ---- receiving ------------------------------------------------------------------------------------

    async def handle(self, message: dict) -> None:
        kind, event_id = message.get("type"), message.get("event_id")
        if kind in ("session.update", "transcription_session.update"):
            before = (self.session.model, self.session.language, self.session.prompt, self.session.rate,
                      json.dumps(self.session.turn_detection))
            self.session.update(message.get("session"), self.service.backend.languages)
            try:
                await run_in_threadpool(self.service.resolve, self.session.model)
            except UnknownModel as exc:
                self.session.model = "whisper-1"
                raise EventError(str(exc), "model_not_found", "session.audio.input.transcription.model") from None
            after = (self.session.model, self.session.language, self.session.prompt, self.session.rate,
                     json.dumps(self.session.turn_detection))
            if after != before:
                self._put("restart", None)
            await self.session_event("updated")
        elif kind == "input_audio_buffer.append":
            self._put("audio", self._pcm(message.get("audio")))
        elif kind == "input_audio_buffer.commit":
            self._put("commit", event_id)
        elif kind == "input_audio_buffer.clear":
            while self.pending and self.pending[-1][0] == "audio":
                self.pending.pop()  # audio not fed yet is dropped too
            self._put("clear", event_id)
        else:
            raise EventError(f"unknown event type {kind!r}", "unknown_event", "type")

    async def run(self) -> None:
        await self.session_event("created")
        processor = asyncio.create_task(self.process())
        try:
            while True:
                if processor.done():
                    processor.result()  # a bug in processing: surface it
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                if message.get("text") is None:
                    await self.error("binary frames are not understood: send JSON events (audio as base64 in "
                                     "input_audio_buffer.append)", "invalid_frame")
                    continue
                try:
                    event = json.loads(message["text"])
                    if not isinstance(event, dict):
                        raise ValueError
                except ValueError:
                    await self.error("the event is not a JSON object", "invalid_json")
                    continue
                try:
                    await self.handle(event)
                except EventError as exc:
                    await self.error(str(exc), exc.code, exc.param, event.get("event_id"))
        except WebSocketDisconnect:
            return
        finally:
            processor.cancel()  # the stream, its buffers and any decode it waits for go with the client
            self.stream = None


router = APIRouter()
KEY_PROTOCOL = "openai-insecure-api-key."


@router.websocket("/v1/realtime")
async def realtime(websocket: WebSocket):
    state = websocket.app.state.whisper  # api.ServerState
    # Browsers cannot set headers on a WebSocket: they offer the key as a subprotocol, as with OpenAI's
    # `new WebSocket(url, ["realtime", "openai-insecure-api-key." + clientSecret])`, and need one of the
    # offered subprotocols back.
    offered = [p.strip() for p in websocket.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
    header = websocket.headers.get("authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else next(
        (p[len(KEY_PROTOCOL):] for p in offered if p.startswith(KEY_PROTOCOL)), "")
    if not state.opens_realtime(token):
        await websocket.close(code=1008, reason="incorrect or missing API key")
        return
    subprotocol = "realtime" if "realtime" in offered else None
    intent = websocket.query_params.get("intent", "transcription")
    service = state.service
    if intent != "transcription" or service is None:
        await websocket.accept(subprotocol=subprotocol)
        reason = ("only intent=transcription is served" if intent != "transcription"
                  else "the model is still loading")
        await websocket.send_text(json.dumps({"event_id": _id("event"), "type": "error", "error": {
            "type": "invalid_request_error", "code": "unsupported", "message": reason, "param": "intent"}}))
        await websocket.close(code=1008, reason=reason)
        return
    await websocket.accept(subprotocol=subprotocol)
    beta = "realtime=v1" in websocket.headers.get("openai-beta", "")
    connection = Connection(websocket, service, beta)
    model = websocket.query_params.get("model")
    if model:
        try:
            await run_in_threadpool(service.resolve, model)
            connection.session.model = model
        except UnknownModel as exc:
            await connection.error(str(exc), "model_not_found", "model")
    await connection.run()
