"""The transcription service every long-running front end shares: a model pool and a batcher.

* `ModelPool`: the base model loaded once; LoRA adapters loaded beside it by name (peft `load_adapter`),
  never merged into the shared weights, chosen per call; the least recently used ones unloaded past a
  limit (never one that a call still uses). Adapters are the subfolders of one folder, found again on
  every lookup, so a folder added later is served without a restart. A request's model name is only
  ever looked up among those subfolders' names: it never becomes a path.
* `Batcher`: one worker thread runs every forward pass. Calls from any number of threads hand it their
  work (encode windows, detect language, decode windows, align words) and wait; it merges the work of
  concurrent calls into one batch, the rows of different adapters included (peft's mixed-adapter
  batches: each LoRA layer gets the adapter name of every row), so many clients share the cost of a
  decoding step. Nothing global is switched per batch, so no call can see another's adapter.
* `TranscriptionService`: admission (a bounded number of calls in the house; more are refused with
  `Busy`, which the server turns into 429), and `transcribe()`, the same lazy iterator of Segments as
  the backends give.
"""
from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from ..audio_ctx import FULL, STREAM_DEFAULT, AudioContext, parse_audio_ctx
from ..decode import CT2Backend, DecodeOptions, Segment, TranscriptionInfo, TransformersBackend
from ..decode.ct2_backend import ADAPTERS_REFUSED
from ..decode.alignatt import AlignAttResult
from ..decode.search import WindowResult
from ..decode.timing import WordTiming
from ..devices import torch_placement
from ..errors import UserError
from ..models import DECODING_FILE, ct2_model_dir, load_model, public_name, recorded_audio_ctx, resolve_model

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch
OPENAI_MODEL = "whisper-1"  # what clients of OpenAI's API send; always the base model here
DIARIZE_MODEL = "gpt-4o-transcribe-diarize"  # OpenAI's diarising model: the base model here, with diarisation on
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
log = logging.getLogger("whisper_lora.serve")


class UnknownModel(UserError):
    """A model name that is neither the base nor a served adapter (HTTP 404)."""


class Busy(Exception):
    """The service holds as many calls as it admits (HTTP 429)."""

    def __init__(self, retry_after: float):
        self.retry_after = retry_after
        super().__init__(f"the server is busy: {retry_after:.0f} s until a slot is likely free")

    def __reduce__(self):  # crosses Ray's process boundary (serve --ray) with its own argument, not the message
        return Busy, (self.retry_after,)


@dataclass(frozen=True)
class ServedModel:
    id: str
    created: int  # Unix seconds
    owned_by: str
    adapter: str | None = None  # the adapter's name, None for the base model


def base_model_name(spec: str | None) -> str:
    """The public name of the base model: the embedded whisper-base is OpenAI's `openai/whisper-base`; a
    folder goes by its name; a hub id by itself."""
    name = public_name(spec)
    return Path(name).name if Path(name).is_absolute() else name


@dataclass
class _Adapter:
    name: str
    path: Path
    mixable: bool  # plain LoRA: peft can mix it with others in one batch (DoRA cannot)
    users: int = 0


class ModelPool:
    """The base model once, adapters by name beside it."""

    def __init__(self, model: str | None = None, adapters_dir: str | None = None, max_adapters: int = 8,
                 backend: str = "transformers", compute_type: str = "default", device: str | None = None,
                 dtype: str | None = None):
        self.base_name = base_model_name(model)
        self.public_base = public_name(model)
        self.adapters_dir = Path(adapters_dir).expanduser().resolve() if adapters_dir else None
        if self.adapters_dir is not None and not self.adapters_dir.is_dir():
            raise UserError("--adapters is not a folder", adapters_dir)
        self.max_adapters = max_adapters
        self.started = int(time.time())
        self.lock = threading.RLock()  # held by every forward pass and by every adapter load or unload
        self._loaded: OrderedDict[str, _Adapter] = OrderedDict()  # least recently used first
        self.refused: dict[str, str] = {}  # adapter folders that cannot be served, with the reason
        self._configs: dict[tuple[Path, int], tuple[dict | None, str | None]] = {}  # by (folder, file mtime)
        self._recorded: dict[tuple[Path, int], object] = {}  # decoding.json's audio_ctx, by (folder, file mtime)
        self.peft = None  # the PeftModel wrapping the base once an adapter is loaded
        self.load_history: deque[str] = deque(maxlen=256)  # adapters in the order they were loaded, newest last
        if backend == "ct2":
            if self.adapters_dir is not None:
                raise UserError(f"--adapters and --backend ct2 conflict: {ADAPTERS_REFUSED}")
            self.backend = CT2Backend(ct2_model_dir(model), compute_type, device or "auto", workers=2, dtype=dtype)
            self.base_location = None
            return
        if self.adapters_dir is not None:
            import peft  # noqa: F401  (now, not at the first adapter request: it takes seconds to import)
        resolved = resolve_model(model)
        if resolved.adapter is not None:
            raise UserError("--model is an adapter: serve its base with --model and put the adapter's folder "
                            "under --adapters (it is then served under the folder's name)", model)
        self.base_location = resolved.location
        device, torch_dtype = torch_placement(device, dtype)
        loaded, processor = load_model(resolved, device=device, dtype=torch_dtype)
        self.backend = TransformersBackend(loaded, processor, device=device)
        self.backend.model_audio_ctx = recorded_audio_ctx(resolved.location)  # a merged --acft model

    def audio_ctx_of(self, adapter: str | None):
        """The encoder context a served model was trained for (an --acft adapter's floor), or None. Asked on
        every request for a name `resolve` has just found: the file is read again only when it changes."""
        if adapter is None:
            return getattr(self.backend, "model_audio_ctx", None)
        folder = self.adapters_dir / adapter
        try:
            key = (folder, (folder / DECODING_FILE).stat().st_mtime_ns)
        except OSError:  # none recorded (or the folder went away: loading it will say so)
            return None
        if key not in self._recorded:
            self._recorded[key] = recorded_audio_ctx(folder)
        return self._recorded[key]

    # ---- names ------------------------------------------------------------------------------------------

    def adapter_folders(self) -> dict[str, Path]:
        """Adapters on disk now that this server can serve: each subfolder holding an adapter_config.json,
        by folder name. Folders it cannot serve (not LoRA, another base, an unreadable config) are left out
        of every listing, kept in `refused` with the reason, and logged once."""
        if self.adapters_dir is None:
            return {}
        found, refused = {}, {}
        for folder in sorted(self.adapters_dir.iterdir()):
            if folder.is_dir() and (folder / "adapter_config.json").is_file() and ADAPTER_NAME.match(folder.name) \
                    and folder.name not in (OPENAI_MODEL, DIARIZE_MODEL, self.base_name):
                _, reason = self._inspect(folder)
                if reason is None:
                    found[folder.name] = folder
                else:
                    refused[folder.name] = reason
                    if self.refused.get(folder.name) != reason:
                        log.warning("not serving %s: %s", folder, reason)
        self.refused = refused  # a folder removed from disk is no longer named as refused either
        return found

    def _inspect(self, folder: Path) -> tuple[dict | None, str | None]:
        """An adapter folder's adapter_config.json, and why the folder cannot be served from what it says
        (None when it can); read again only when the file changes."""
        config_file = folder / "adapter_config.json"
        try:
            key = (folder, config_file.stat().st_mtime_ns)
        except OSError as exc:  # removed since the folder was listed
            return None, f"adapter_config.json cannot be read ({exc})"
        if key not in self._configs:
            try:
                config = json.loads(config_file.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                self._configs[key] = None, f"adapter_config.json cannot be read ({exc})"
            else:
                self._configs[key] = config, self._not_servable(folder.name, config)
        return self._configs[key]

    def _not_servable(self, name: str, config: dict) -> str | None:
        if config.get("peft_type") != "LORA":
            return (f"adapter '{name}' is {config.get('peft_type')}, not LoRA; serving loads LoRA and DoRA adapters: "
                    "merge it (`whisper-lora merge`) and serve the merged model with --model")
        return self._base_mismatch(name, config.get("base_model_name_or_path"))

    def models(self) -> list[ServedModel]:
        served = [ServedModel(OPENAI_MODEL, self.started, "whisper-lora"),
                  ServedModel(self.base_name, self.started, "whisper-lora")]
        for name, folder in self.adapter_folders().items():
            served.append(ServedModel(name, int(folder.stat().st_mtime), "whisper-lora", adapter=name))
        return served

    def resolve(self, name: str | None) -> str | None:
        """The adapter a model name stands for; None for the base model."""
        if not name or name in (OPENAI_MODEL, DIARIZE_MODEL, self.base_name):
            return None
        if name in self.adapter_folders():
            return name
        available = ", ".join(m.id for m in self.models())
        if name in self.refused:
            raise UnknownModel(f"model '{name}' is not served: {self.refused[name]}; this server has: {available}")
        raise UnknownModel(f"model '{name}' does not exist; this server has: {available}")

    # ---- adapters ---------------------------------------------------------------------------------------

    @contextmanager
    def using(self, adapter: str | None):
        """Keep `adapter` loaded (loading it if needed) for the duration of one call."""
        if adapter is None:
            yield None
            return
        with self.lock:
            entry = self._loaded.get(adapter) or self._load(adapter)
            entry.users += 1
            self._loaded.move_to_end(adapter)
            self._evict()  # room for it, from the idle ones
        try:
            yield adapter
        finally:
            with self.lock:
                entry.users -= 1
                self._evict()

    def preload(self, adapter: str) -> None:
        """Load an adapter now (Ray Serve's multiplexer does, before the call that wants it), as the most
        recently used one."""
        with self.lock:
            if adapter not in self._loaded:
                self._load(adapter)
            self._loaded.move_to_end(adapter)
            self._evict()

    def is_mixable(self, adapter: str) -> bool:
        entry = self._loaded.get(adapter)
        return entry is None or entry.mixable

    def _load(self, name: str) -> _Adapter:
        path = self.adapter_folders().get(name)
        if path is None:  # removed from disk, or changed into something unservable, since it was resolved
            if name in self.refused:
                raise UserError(self.refused[name], self.adapters_dir / name)
            raise UnknownModel(f"model '{name}' does not exist")
        config, reason = self._inspect(path)
        if reason is not None:  # rewritten into something unservable since it was listed
            raise UserError(reason, path)
        from peft import PeftModel

        try:
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.backend.model, str(path), adapter_name=name)
                self.peft.eval()
            else:
                self.peft.load_adapter(str(path), adapter_name=name)
        except (RuntimeError, ValueError, OSError, KeyError) as exc:
            reason = str(exc).strip().splitlines()[0][:200]
            raise UserError(f"adapter '{name}' does not fit the base model {self.base_name} ({reason})", path) from None
        entry = _Adapter(name, path, mixable=not config.get("use_dora", False))
        self._loaded[name] = entry
        self.load_history.append(name)
        return entry

    def _base_mismatch(self, name: str, recorded: str | None) -> str | None:
        """An adapter trained on another base would load (same shapes) and transcribe badly: refuse it."""
        if not recorded or public_name(recorded) == self.public_base:
            return None
        try:
            location = resolve_model(recorded).location
        except UserError:
            return None  # a base we cannot resolve here (a folder on another machine): the weights' shapes decide
        if location != self.base_location and Path(location).name != Path(self.base_location).name:
            return f"adapter '{name}' was trained on {recorded}, this server's base model is {self.base_name}"
        return None

    def _evict(self) -> None:
        """Unload the least recently used adapters nobody is using, down to `max_adapters`."""
        while len(self._loaded) > self.max_adapters:
            idle = next((a for a in self._loaded.values() if a.users == 0), None)
            if idle is None:
                return  # every loaded adapter is in use: unloaded once its calls end
            del self._loaded[idle.name]
            self.peft.delete_adapter(idle.name)

    @property
    def loaded_adapters(self) -> list[str]:
        return list(self._loaded)


@dataclass
class _Work:
    op: str  # encode | detect | decode | align | alignatt
    key: object  # work with equal keys can share a batch
    args: tuple
    rows: int
    adapter: str  # BASE for the base model
    future: Future = field(default_factory=Future)
    queued: float = field(default_factory=time.monotonic)


class Batcher:
    """One worker thread; the model work of concurrent calls merged into batches.

    A partial batch waits up to `max_wait` seconds for the work of the other calls under way, and no
    longer than until each of them has handed in its next piece. With `max_wait=math.inf` the batches
    depend only on which calls are under way, never on how fast a thread runs: calls started together
    while the worker is `paused()` then go through every step in lockstep."""

    def __init__(self, pool: ModelPool, max_wait: float, max_batch: int = 8, mixed_adapters: bool = False):
        self.pool, self.max_batch, self.max_wait, self.mixed_adapters = pool, max_batch, max_wait, mixed_adapters
        self._pending: list[_Work] = []
        self._cond = threading.Condition()
        self._closed = False
        self._paused = False
        self.active_calls = 0  # calls that may submit more work soon: worth a short wait for them
        self.batches = 0
        self.batched_rows = 0
        self.recent: deque[tuple[str, tuple[str, ...]]] = deque(maxlen=256)  # (op, each row's adapter), newest last
        self._thread = threading.Thread(target=self._loop, name="whisper-lora-batcher", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        with self._cond:
            return len(self._pending)

    def call_started(self) -> None:
        with self._cond:
            self.active_calls += 1
            self._cond.notify_all()

    def call_ended(self) -> None:
        with self._cond:
            self.active_calls -= 1
            self._cond.notify_all()  # a batch waiting for this call's work need not wait any longer

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    @contextmanager
    def paused(self):
        """The worker takes no new work inside the block; what was submitted meanwhile is batched after it.
        For lining up calls that must meet in one batch (a warm-up, a test) without relying on timing."""
        with self._cond:
            self._paused = True
        try:
            yield self
        finally:
            with self._cond:
                self._paused = False
                self._cond.notify_all()

    def wait_until(self, predicate, timeout: float | None = None) -> bool:
        """Block until `predicate(self)` holds, checked whenever work is submitted or a call starts or
        ends; False if `timeout` seconds passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout)

    def submit(self, op: str, key, args: tuple, rows: int, adapter: str | None):
        work = _Work(op, key, args, rows, adapter or BASE)
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._pending.append(work)
            self._cond.notify_all()
        return work.future.result()

    # ---- the worker -------------------------------------------------------------------------------------

    def _compatible(self, first: _Work, other: _Work) -> bool:
        if other.op != first.op or other.key != first.key or first.op in ("align", "alignatt"):
            return other is first
        if first.adapter == other.adapter:
            return True
        both_mixable = self.pool.is_mixable(first.adapter) and self.pool.is_mixable(other.adapter)
        return self.mixed_adapters and both_mixable

    def _group(self, first: _Work) -> tuple[list[_Work], int]:
        group, rows = [], 0
        for work in self._pending:
            if self._compatible(first, work) and rows + work.rows <= max(self.max_batch, first.rows):
                group.append(work)
                rows += work.rows
        return group, rows

    def _next(self) -> _Work:
        """The work to batch next: a full batch of anything first (oldest first); else encoding, whose
        output is more decoding to batch; else the oldest. Encoding costs the same per window batched or
        not on a CPU; a decoding step costs little more for eight windows than for one, so decoding is
        what is worth gathering into full batches."""
        for work in self._pending:
            if self._group(work)[1] >= self.max_batch:
                return work
        return next((w for w in self._pending if w.op == "encode"), self._pending[0])

    def _take(self) -> list[_Work] | None:
        with self._cond:
            while (self._paused or not self._pending) and not self._closed:
                self._cond.wait()
            if not self._pending:
                return None
            first = self._next()
            while True:  # a short wait for the rest of a batch, only while other calls are under way
                group, rows = self._group(first)
                waited = time.monotonic() - first.queued
                others = self.active_calls - len(self._pending)  # a call has at most one piece pending
                if rows >= self.max_batch or others <= 0 or waited >= self.max_wait or self._closed:
                    break
                self._cond.wait(None if math.isinf(self.max_wait) else self.max_wait - waited)
            taken = set(map(id, group))
            self._pending = [w for w in self._pending if id(w) not in taken]
            return group

    def _loop(self) -> None:
        while (group := self._take()) is not None:
            # counted before any caller is answered: a caller reading the counts after its call returned
            # sees the batch that answered it
            self.batches += 1
            self.batched_rows += sum(w.rows for w in group)
            self.recent.append((group[0].op, tuple(w.adapter for w in group for _ in range(w.rows))))
            try:
                with self.pool.lock:
                    results = self._run(group)
                for work, result in zip(group, results):
                    work.future.set_result(result)
            except BaseException as exc:  # the calls fail, the worker lives on
                for work in group:
                    if not work.future.done():
                        work.future.set_exception(exc)

    def _adapters(self, group: list[_Work]) -> list[str] | None:
        if self.pool.peft is None:
            return None  # no adapter was ever loaded: plain layers
        return [w.adapter for w in group for _ in range(w.rows)]

    def _run(self, group: list[_Work]) -> list:
        import torch

        backend, op = self.pool.backend, group[0].op
        adapters = self._adapters(group)
        if group[0].adapter != BASE and not self.pool.is_mixable(group[0].adapter):
            self.pool.peft.set_adapter(group[0].adapter)  # DoRA: one adapter per batch, chosen here
            adapters = None
        if op in ("align", "alignatt"):  # one row each: a decoder pass over one window's own tokens
            (work,) = group
            run = backend.align_row if op == "align" else backend.alignatt_row
            return [run(*work.args, adapter=None if adapters is None else adapters[0])]
        if op == "encode":
            encoded = backend.encode_rows(torch.cat([w.args[0] for w in group]), adapters)
            return list(torch.split(encoded, [w.rows for w in group]))
        if op == "detect":
            detected = backend.detect_rows(torch.cat([w.args[0] for w in group]), adapters)
            return _split_list(detected, group)
        encoded = torch.cat([w.args[0] for w in group])
        prefixes = [p for w in group for p in w.args[1]]
        options, timestamps = group[0].key[0], group[0].key[1]
        return _split_list(backend.decode_rows(encoded, prefixes, options, timestamps, adapters), group)


def _split_list(values: list, group: list[_Work]) -> list[list]:
    out, start = [], 0
    for work in group:
        out.append(values[start:start + work.rows])
        start += work.rows
    return out


class BatchedWindowModel:
    """`longform.WindowModel` for one backend, its model work handed to the batcher; features are
    computed in the calling thread."""

    def __init__(self, backend: TransformersBackend, batcher: Batcher):
        self.backend, self.batcher, self.tokens = backend, batcher, backend.tokens

    def features(self, audios: list[np.ndarray]):
        return self.backend.features(audios)

    def block_features(self, audio: np.ndarray):
        return self.backend.block_features(audio)

    def encode(self, features, adapter: str | None):
        return self.batcher.submit("encode", (tuple(features.shape[1:]), features.dtype), (features,), len(features),
                                   adapter)

    def detect(self, encoded, adapter: str | None) -> list[tuple[str, float]]:
        # rows of one batch share an encoder length (`--audio-ctx auto` gives windows several): grouped by it
        return self.batcher.submit("detect", encoded.shape[1], (encoded,), len(encoded), adapter)

    def decode(self, encoded, prefixes: list[list[int]], options: DecodeOptions, timestamps: bool,
               adapter: str | None) -> list[WindowResult]:
        # the context setting has done its work once encoded: windows of any setting but one length batch
        key = (replace(options, audio_ctx=None), timestamps, len(prefixes[0]), encoded.shape[1])
        return self.batcher.submit("decode", key, (encoded, prefixes),
                                   len(prefixes), adapter)

    def align(self, encoded, text_tokens: list[int], language: str | None, task: str, num_frames: int,
              adapter: str | None) -> list[WordTiming]:
        return self.batcher.submit("align", None, (encoded, text_tokens, language, task, num_frames), 1, adapter)

    def alignatt(self, encoded, prefix: list[int], forced: int, content: int, final: bool, max_new: int,
                 language: str | None, start_position: int, threshold: int, adapter: str | None) -> AlignAttResult:
        return self.batcher.submit("alignatt", None, (encoded, prefix, forced, content, final, max_new, language,
                                                      start_position, threshold), 1, adapter)


class OpensStreams:
    """`open_stream` for a service that has `transcribe`, `stream_step`, `resolve`, `_audio_ctx`,
    `stream_policy` and `streams_alignatt`: the in-process service and the Ray Serve gateway's remote one."""

    def open_stream(self, model: str | None, language: str | None, prompt: str | None = None, options=None,
                    patience: float = 0.0):
        """A StreamingTranscriber decoding through this service (the server's policy and encoder context).
        `patience`: seconds a decode keeps retrying while the house is full, instead of failing at once
        (a live stream waits its turn rather than lose its words)."""
        from ..streaming import StreamingTranscriber, StreamOptions

        options = options or StreamOptions()
        policy = self.stream_policy or options.policy
        if policy == "alignatt" and not self.streams_alignatt:
            policy = "local-agreement"  # CTranslate2: no cross-attention to read
        options = replace(options, policy=policy,
                          audio_ctx=self._audio_ctx(self.resolve(model), options.audio_ctx or STREAM_DEFAULT))

        def patiently(call):
            deadline = time.monotonic() + patience
            while True:
                try:
                    return call()
                except Busy:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)

        def decode(audio, decode_options):
            return patiently(lambda: list(self.transcribe(audio, model, language, decode_options)[0]))

        def step(audio, decode_options, final, start):
            return patiently(lambda: self.stream_step(audio, model, language, decode_options, final, start))

        return StreamingTranscriber(decode, language, prompt, options, step=step)


class Held:
    """Segments that hold what their call took (an admission slot, an adapter, a replica's stream) until they
    are consumed, fail, or are closed, started or not: a generator closed before its first item never runs its
    `finally`, which is what a client that leaves before the first byte of a stream does."""

    def __init__(self, segments: Iterable[Segment], release: Callable[[], None]):
        self._segments, self._release, self._released = iter(segments), release, False
        self._lock = threading.Lock()

    def __iter__(self) -> Held:
        return self

    def __next__(self) -> Segment:
        try:
            return next(self._segments)
        except BaseException:  # the end, or a failure: either way the call is over
            self.close()
            raise

    def close(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        try:
            close = getattr(self._segments, "close", None)
            if close is not None:
                close()
        finally:
            self._release()


class TranscriptionService(OpensStreams):
    """What the server, the web UI and realtime streams call: many threads at once, one model."""

    def __init__(self, pool: ModelPool, max_wait: float, max_queue: int = 64, max_batch: int = 8,
                 mixed_adapters: bool = False, audio_ctx: AudioContext | None = None, stream_policy: str | None = None):
        self.pool, self.max_queue = pool, max_queue
        # --audio-ctx: for calls whose options leave it to the server; None: full for requests, auto for streams
        self.audio_ctx = parse_audio_ctx(audio_ctx)
        self.stream_policy = stream_policy  # of realtime streams (streaming.POLICIES); None: StreamOptions' default
        self.batcher = None
        self.backend = pool.backend
        if isinstance(pool.backend, TransformersBackend):
            self.batcher = Batcher(pool, max_batch=max_batch, max_wait=max_wait, mixed_adapters=mixed_adapters)
            self.backend = pool.backend.batched(BatchedWindowModel(pool.backend, self.batcher))
        self._admitted = 0
        self._lock = threading.Lock()
        self._recent_seconds = 2.0  # running mean of a call's wall time, for Retry-After

    @property
    def in_flight(self) -> int:
        return self._admitted

    @property
    def queue_depth(self) -> int:
        return self.batcher.depth if self.batcher else 0

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()

    def models(self) -> list[ServedModel]:
        return self.pool.models()

    def resolve(self, model: str | None) -> str | None:
        return self.pool.resolve(model)

    @contextmanager
    def admitted(self):
        """One call in the house, or Busy when `max_queue` are already."""
        with self._lock:
            if self._admitted >= self.max_queue:
                raise Busy(max(1.0, self._recent_seconds * self._admitted / max(1, self.max_queue)))
            self._admitted += 1
        if self.batcher:
            self.batcher.call_started()
        started = time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self._admitted -= 1
                self._recent_seconds = 0.8 * self._recent_seconds + 0.2 * (time.monotonic() - started)
            if self.batcher:
                self.batcher.call_ended()

    def transcribe(self, audio: np.ndarray | str | Path, model: str | None = None, language: str | None = None,
                   options: DecodeOptions = DecodeOptions(), vad: bool = False
                   ) -> tuple[Iterator[Segment], TranscriptionInfo]:
        """Like a backend's `transcribe`, for the base model or an adapter by name. The call holds its
        admission slot and its adapter until the segments are consumed (or the iterator is closed)."""
        adapter = self.resolve(model)
        if language and language not in self.backend.languages:
            raise UserError(f"the model has no language '{language}'")
        if options.audio_ctx is None:
            options = replace(options, audio_ctx=self._audio_ctx(adapter, FULL))
        admission = self.admitted()
        admission.__enter__()
        using = self.pool.using(adapter)
        try:
            using.__enter__()
            segments, info = self.backend.transcribe(audio, language, options, vad=vad, adapter=adapter)
        except BaseException as exc:
            using.__exit__(type(exc), exc, exc.__traceback__)
            admission.__exit__(type(exc), exc, exc.__traceback__)
            raise

        def release() -> None:
            using.__exit__(None, None, None)
            admission.__exit__(None, None, None)

        return Held(segments, release), info

    def transcribe_clips(self, audios: list[np.ndarray], model: str | None = None, language: str | None = None,
                         options: DecodeOptions = DecodeOptions()) -> list[tuple[list[Segment], TranscriptionInfo]]:
        """Clips of at most 30 s decoded together as `transcribe` decodes a folder of clips (the backend's
        `transcribe_batch`): one admission slot and one adapter for them all."""
        adapter = self.resolve(model)
        if language and language not in self.backend.languages:
            raise UserError(f"the model has no language '{language}'")
        if options.audio_ctx is None:
            options = replace(options, audio_ctx=self._audio_ctx(adapter, FULL))
        with self.admitted(), self.pool.using(adapter):
            return self.backend.transcribe_batch(audios, [language] * len(audios), options, adapter=adapter)

    def _audio_ctx(self, adapter: str | None, fallback):
        """The encoder context of a call that leaves it open: the server's --audio-ctx, else what the model
        was trained for (an --acft adapter's floor), else the path's own default (`fallback`)."""
        return self.audio_ctx or self.pool.audio_ctx_of(adapter) or fallback

    @property
    def has_token_logprobs(self) -> bool:
        """Each token's log-probability comes from our decoding loop; CTranslate2 gives only their mean."""
        return isinstance(self.backend, TransformersBackend)

    def token_bytes(self, ids: list[int]) -> list[bytes]:
        from ..tokens import token_bytes

        return token_bytes(self.pool.backend.tokens.tokenizer, ids)

    @property
    def streams_alignatt(self) -> bool:
        """AlignAtt reads the decoder's cross-attention: our decoding loop has it, CTranslate2's does not."""
        return isinstance(self.backend, TransformersBackend)

    def stream_step(self, audio: np.ndarray, model: str | None, language: str | None, options: DecodeOptions,
                    final: bool, start: float = 0.0) -> tuple[list, list, str]:
        """One AlignAtt decode of a streaming buffer (TransformersBackend.stream_step), for a model or adapter
        by name, holding an admission slot and the adapter while it runs."""
        if not self.streams_alignatt:
            raise UserError("the alignatt streaming policy needs --backend transformers (CTranslate2 does not "
                            "expose cross-attention); use local-agreement")
        adapter = self.resolve(model)
        if options.audio_ctx is None:
            options = replace(options, audio_ctx=self._audio_ctx(adapter, STREAM_DEFAULT))
        with self.admitted(), self.pool.using(adapter):
            return self.backend.stream_step(audio, language, options, final, start, adapter=adapter)
