"""OpenAI's audio API over the transcription service, plus /health and /metrics.

The routes parse OpenAI's multipart fields, call `TranscriptionService.transcribe` in a worker thread,
and shape the segments into OpenAI's responses: json, text, srt, vtt, verbose_json (segments, words),
or server-sent events with `stream=true`. Model work never runs on the event loop.
"""
from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import tempfile
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.datastructures import UploadFile

from .. import __version__
from ..decode import DecodeOptions, Segment, TranscriptionInfo, join_text
from ..errors import UserError
from ..manifest import language_code
from ..service import TranscriptionService
from ..writers import WRITERS
from . import errors
from .errors import APIError
from .limits import UploadLimit, UploadTooLarge
from .metrics import Metrics

RESPONSE_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
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


def _field(form, name: str) -> str | None:
    value = form.get(name)
    if value is None or isinstance(value, UploadFile):
        return None
    return str(value).strip() or None


def _flag(form, name: str) -> bool:
    value = (_field(form, name) or "false").lower()
    if value not in ("true", "false", "1", "0"):
        raise APIError(400, f"'{name}' must be true or false, got '{value}'", param=name)
    return value in ("true", "1")


def parse_request(form, task: str, languages: set[str]) -> TranscriptionRequest:
    model = _field(form, "model")
    if model is None:
        raise APIError(400, "you must provide a model parameter", param="model", code="missing_required_parameter")
    response_format = _field(form, "response_format") or "json"
    if response_format not in RESPONSE_FORMATS:
        raise APIError(400, f"response_format must be one of {', '.join(RESPONSE_FORMATS)}, got '{response_format}'",
                       param="response_format")
    language = _field(form, "language") if task == "transcribe" else None
    if language is not None:
        try:
            language = language_code(language, "language")
        except UserError as exc:
            raise APIError(400, str(exc), param="language") from None
        if language not in languages:
            raise APIError(400, f"the model has no language '{language}'", param="language")
    try:
        temperature = float(_field(form, "temperature") or 0.0)
    except ValueError:
        raise APIError(400, "temperature must be a number between 0 and 1", param="temperature") from None
    if not 0.0 <= temperature <= 1.0 or math.isnan(temperature):
        raise APIError(400, f"temperature must lie between 0 and 1, got {temperature}", param="temperature")
    granularities = set(form.getlist("timestamp_granularities[]") or form.getlist("timestamp_granularities"))
    unknown = granularities - set(GRANULARITIES)
    if unknown:
        raise APIError(400, f"timestamp_granularities must be word and/or segment, got {', '.join(sorted(unknown))}",
                       param="timestamp_granularities")
    if granularities and response_format != "verbose_json":
        raise APIError(400, "timestamp_granularities needs response_format verbose_json",
                       param="timestamp_granularities")
    include = set(form.getlist("include[]"))
    if include:
        raise APIError(400, f"include[] {', '.join(sorted(include))} is not available for Whisper models",
                       param="include")
    chunking = _field(form, "chunking_strategy") or _field(form, "chunking_strategy[type]")
    if chunking not in (None, "auto", "server_vad"):
        raise APIError(400, f"chunking_strategy must be auto or server_vad, got '{chunking}'", param="chunking_strategy")
    stream = _flag(form, "stream")
    if stream and task == "translate":
        raise APIError(400, "stream is available for transcriptions only", param="stream")
    words = "word" in granularities
    options = DecodeOptions(task=task, temperature=(temperature,) if temperature > 0 else DEFAULT_TEMPERATURES,
                            initial_prompt=_field(form, "prompt"), word_timestamps=words,
                            # segment times are only needed for the formats that show them, and to stream a
                            # clip segment by segment
                            without_timestamps=response_format in ("json", "text") and not words and not stream)
    sentiment = _flag(form, "sentiment")
    if sentiment and response_format not in ("json", "verbose_json"):
        raise APIError(400, "sentiment needs response_format json or verbose_json", param="sentiment")
    return TranscriptionRequest(task, model, language, options, response_format, words,
                                "segment" in granularities or not granularities, stream, chunking is not None, sentiment)


def language_name(code: str | None) -> str:
    """OpenAI's verbose_json names the language ("english"), as Whisper's own tokenizer table does."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    return LANGUAGES.get(code or "", code or "")


def sentiment_json(sentiment) -> dict | None:
    return None if sentiment is None else {"label": sentiment.label, "score": sentiment.score}


def segment_json(segment: Segment) -> dict:
    extra = {"sentiment": sentiment_json(segment.sentiment)} if segment.sentiment is not None else {}
    return {**extra, "id": segment.id, "seek": segment.seek, "start": segment.start, "end": segment.end, "text": segment.text,
            "tokens": segment.tokens, "temperature": segment.temperature or 0.0,
            "avg_logprob": segment.avg_logprob if segment.avg_logprob is not None else 0.0,
            "compression_ratio": segment.compression_ratio or 0.0,
            "no_speech_prob": segment.no_speech_prob if segment.no_speech_prob is not None else 0.0}


def render(request: TranscriptionRequest, segments: list[Segment], info: TranscriptionInfo) -> Response:
    text = join_text(segments, info.language)
    usage = {"type": "duration", "seconds": round(info.duration, 3)}
    scored = {}
    if request.sentiment:
        scored = {"sentiment": sentiment_json(info.sentiment)}
        if info.sentiment_note:
            scored["sentiment_note"] = info.sentiment_note
    if request.response_format == "json":
        body = {"text": text, **scored}
        if request.task == "transcribe":
            body["usage"] = usage
        return JSONResponse(body)
    if request.response_format == "verbose_json":
        body = {"task": request.task, "language": language_name("en" if request.task == "translate" else info.language),
                "duration": round(info.duration, 3), "text": text, **scored}
        if request.segments:
            body["segments"] = [segment_json(s) for s in segments]
        if request.words:
            body["words"] = [{"word": w.word.strip(), "start": w.start, "end": w.end}
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

    def __init__(self, app, state: dict, api_key: str | None):
        self.app, self.state, self.api_key = app, state, api_key

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
            if self.state["metrics"] is not None:
                self.state["metrics"].observe(endpoint, status, time.monotonic() - started)

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


def create_app(load_service: Callable[[], TranscriptionService], api_key: str | None = None,
               max_upload_mb: float = 25.0, max_queue: int = 64, sentiment_model: str | None = None,
               ui: bool = True) -> FastAPI:
    """The ASGI app. `load_service` runs in a thread at start-up; /health answers 503 until it returns,
    so an orchestrator can tell a loading server from a dead one."""
    state: dict = {"service": None, "metrics": None, "error": None}

    def load() -> None:
        try:
            service = load_service()
            state["metrics"] = Metrics(service)
            state["service"] = service
        except BaseException as exc:  # reported by /health and the log; the process stays up to say so
            state["error"] = exc
            errors.log.error("could not load the model: %s", exc)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        import anyio.to_thread

        # Every admitted request holds a worker thread while its audio is decoded; more threads than
        # requests admitted would only queue behind the batcher.
        anyio.to_thread.current_default_thread_limiter().total_tokens = max(40, max_queue + 8)
        loader = threading.Thread(target=load, name="whisper-lora-load", daemon=True)
        loader.start()
        yield
        loader.join(timeout=0)
        if state["service"] is not None:
            state["service"].close()

    app = FastAPI(title="whisper-lora", version=__version__, lifespan=lifespan)
    app.state.whisper = state
    errors.install(app)

    @app.exception_handler(UploadTooLarge)
    async def _too_large(request: Request, exc: UploadTooLarge):
        return errors.response(APIError(413, str(exc), param="file", code="file_too_large"))

    def service() -> TranscriptionService:
        if state["service"] is None:
            if state["error"] is not None:
                raise APIError(503, f"the model could not be loaded: {state['error']}", type="server_error")
            raise APIError(503, "the model is still loading", type="server_error", headers={"Retry-After": "5"})
        return state["service"]

    app.add_middleware(Gate, state=state, api_key=api_key)
    app.add_middleware(UploadLimit, limit_mb=max_upload_mb)

    @app.get("/health")
    async def health():
        if state["service"] is not None:
            return {"status": "ok", "models": [m.id for m in state["service"].models()]}
        if state["error"] is not None:
            return JSONResponse({"status": "error", "error": str(state["error"])}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/metrics")
    async def metrics_text():
        if state["metrics"] is None:
            return PlainTextResponse("", status_code=503)
        return Response(state["metrics"].render(), media_type=state["metrics"].content_type)

    def model_json(model) -> dict:
        return {"id": model.id, "object": "model", "created": model.created, "owned_by": model.owned_by}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_json(m) for m in service().models()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        for model in service().models():
            if model.id == model_id:
                return model_json(model)
        raise APIError(404, f"model '{model_id}' does not exist", param="model", code="model_not_found")

    async def audio_request(request: Request, task: str) -> Response:
        svc = service()
        form = await request.form(max_files=1, max_fields=64)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise APIError(400, "you must provide a file parameter (multipart form field 'file')", param="file",
                           code="missing_required_parameter")
        parsed = parse_request(form, task, svc.backend.languages)
        svc.resolve(parsed.model)  # an unknown model is a 404 before any audio is decoded
        stored = await run_in_threadpool(_Upload, upload)
        try:
            segments, info = await run_in_threadpool(svc.transcribe, stored.path, parsed.model, parsed.language,
                                                     parsed.options, parsed.vad)
        except BaseException as exc:
            stored.remove()
            raise errors.as_api_error(exc, stored.name) from None
        if parsed.stream:
            return StreamingResponse(_events(svc, parsed, segments, info, stored), media_type="text/event-stream")
        try:
            collected = await run_in_threadpool(list, segments)
            if parsed.sentiment:
                collected, info = await run_in_threadpool(_sentiment, collected, info)
        except BaseException as exc:
            raise errors.as_api_error(exc, stored.name) from None
        finally:
            stored.remove()
        _count_audio(parsed, info)
        return render(parsed, collected, info)

    def _sentiment(segments: list[Segment], info: TranscriptionInfo):
        from dataclasses import replace

        from ..sentiment import annotate

        scored, overall, note = annotate(segments, join_text(segments, info.language), info.language, sentiment_model)
        return scored, replace(info, sentiment=overall, sentiment_note=note)

    def _count_audio(parsed: TranscriptionRequest, info: TranscriptionInfo) -> None:
        if state["metrics"] is not None:
            state["metrics"].audio_seconds.labels(parsed.model).inc(info.duration)

    async def _events(svc, parsed: TranscriptionRequest, segments: Iterator[Segment], info: TranscriptionInfo,
                      stored: _Upload):
        """transcript.text.delta per segment as soon as it is decoded, then transcript.text.done with the
        whole text: the deltas, joined, are exactly that text."""
        parts: list[str] = []
        separator = "" if join_text([Segment(0, 0, 0, "a"), Segment(1, 0, 0, "b")], info.language) == "ab" else " "
        try:
            async for segment in iterate_in_threadpool(segments):
                if not segment.text:
                    continue
                delta = segment.text if not parts else separator + segment.text
                parts.append(delta)
                yield sse({"type": "transcript.text.delta", "delta": delta})
            yield sse({"type": "transcript.text.done", "text": "".join(parts)})
            _count_audio(parsed, info)
        except Exception as exc:  # the status line is sent already: the error travels as an event
            error = errors.as_api_error(exc, stored.name)
            yield sse(errors.error_body(error.message, error.type, error.param, error.code))
        finally:
            close = getattr(segments, "close", None)
            if close is not None:
                await run_in_threadpool(close)  # releases the admission slot and the adapter
            stored.remove()

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request):
        return await audio_request(request, "transcribe")

    @app.post("/v1/audio/translations")
    async def translations(request: Request):
        return await audio_request(request, "translate")

    from .realtime import install as install_realtime

    install_realtime(app, state, api_key)
    if ui:
        from fastapi.responses import RedirectResponse

        from .ui import mount

        @app.get("/", include_in_schema=False)
        async def home():
            return RedirectResponse("/ui/")

        app = mount(app, service, api_key=api_key, sentiment_model=sentiment_model)
    return app
