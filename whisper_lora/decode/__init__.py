"""The inference core: audio in, typed `Segment`s out, lazily, window by window.

    types.py       Segment, Word, TranscriptionInfo, DecodeOptions; the Backend protocol
    kv.py          the encoder and key/value-cache decoder over transformers modules (adapters per row)
    rules.py       the logit filters (suppression, timestamp grammar)
    search.py      greedy / sampled / beam search, temperature fallback
    timing.py      word timestamps: alignment heads + DTW
    longform.py    windows of long audio, VAD windows, batches of clips
    transformers_backend.py, ct2_backend.py   the two backends

Every front end (CLI, evaluation, export, server, web UI, realtime) calls a Backend's `transcribe()`,
which returns `(segments, info)` with `segments` a lazy iterator, as in faster-whisper.
"""
from __future__ import annotations

from .types import GREEDY, Backend, DecodeOptions, Segment, Sentiment, TranscriptionInfo, Word, join_text

# The backends import torch (2.4 s on two cores). Loaded when first named, so a process that only describes a
# decode (DecodeOptions, Segment: `transcribe --ray`'s driver, which hands the decoding to its actors) never
# pays for it.
_BACKENDS = {"CT2Backend": "ct2_backend", "TransformersBackend": "transformers_backend",
             "default_device": "transformers_backend"}


def __getattr__(name: str):
    if name in _BACKENDS:
        from importlib import import_module

        return getattr(import_module(f".{_BACKENDS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_backend(model: str | None = None, backend: str = "transformers", compute_type: str = "default",
                 device: str | None = None, compile: bool = False, dtype: str | None = None) -> Backend:
    """The backend for `--model` as users pass it: an adapter is merged into a private copy of its base
    (identical output, no LoRA matmuls); `ct2` needs a CTranslate2 folder (or the embedded default).
    `device` and `dtype` as `--device` and `--dtype` take them (see devices.py)."""
    from ..devices import torch_placement
    from ..models import ct2_model_dir, load_model, recorded_audio_ctx, resolve_model
    from .ct2_backend import CT2Backend
    from .transformers_backend import TransformersBackend

    if backend == "ct2":
        return CT2Backend(ct2_model_dir(model), compute_type, device or "auto", dtype=dtype)
    device, torch_dtype = torch_placement(device, dtype)
    resolved = resolve_model(model)
    loaded, processor = load_model(resolved, device=device, dtype=torch_dtype, merge_adapter=True)
    backend = TransformersBackend(loaded, processor, device=device, compile=compile)
    # an adapter trained with --acft reads at its short-context floor unless a command says otherwise
    backend.model_audio_ctx = recorded_audio_ctx(resolved.adapter or resolved.location)
    return backend


__all__ = ["Backend", "CT2Backend", "DecodeOptions", "GREEDY", "Segment", "Sentiment", "TranscriptionInfo", "TransformersBackend",
           "Word", "default_device", "join_text", "load_backend"]
