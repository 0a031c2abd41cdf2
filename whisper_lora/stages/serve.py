"""`whisper-lora serve`: the OpenAI-compatible transcription server (FastAPI + uvicorn)."""
from __future__ import annotations

import os

from ..config import ServeConfig
from ..errors import UserError

SERVE_PIP = "pip install 'whisper-lora[serve]'"


def build_service(config: ServeConfig):
    from ..serve.service import ModelPool, TranscriptionService

    pool = ModelPool(config.model, config.adapters, config.max_adapters, config.backend, config.compute_type,
                     config.device, config.dtype)
    return TranscriptionService(pool, max_wait=config.batch_wait_ms / 1000, max_queue=config.max_queue,
                                max_batch=config.max_batch, mixed_adapters=config.mixed_adapters,
                                audio_ctx=config.audio_ctx, stream_policy=config.policy)


def create_app(config: ServeConfig):
    try:
        from ..serve.api import create_app as create
    except ImportError as exc:
        raise UserError(f"serve needs {exc.name}: {SERVE_PIP}") from None
    api_key = config.api_key or os.environ.get("WHISPER_LORA_API_KEY") or None
    return create(lambda: build_service(config), api_key=api_key, max_upload_mb=config.max_upload_mb,
                  max_queue=config.max_queue, sentiment_model=config.sentiment_model, ui=config.ui,
                  diarizer=config.diarizer, device=config.device)


def check_placement(config: ServeConfig) -> None:
    """A GPU that is not there is refused in one line now, not by /health once the loader thread has run."""
    from ..devices import ct2_placement, resolve_device

    if config.backend == "ct2":
        ct2_placement(config.device, config.dtype, config.compute_type)
    else:
        resolve_device(config.device)


def run_ray(config: ServeConfig) -> int:
    try:
        from . import serve_ray
    except ImportError as exc:
        raise UserError(f"serve --ray needs {exc.name}: pip install 'whisper-lora[ray]'") from None
    return serve_ray.run(config)


def run(config: ServeConfig) -> int:
    if config.ray:
        return run_ray(config)
    try:
        import uvicorn
    except ImportError:
        raise UserError(f"serve needs uvicorn: {SERVE_PIP}") from None
    check_placement(config)
    app = create_app(config)
    print(f"whisper-lora: serving on http://{config.host}:{config.port} (OpenAI API under /v1; /health says when "
          "the model is loaded)", flush=True)
    # uvicorn finishes the requests in flight on SIGTERM before it exits (no graceful-shutdown timeout).
    uvicorn.run(app, host=config.host, port=config.port, log_level=config.log_level, timeout_graceful_shutdown=None)
    return 0
