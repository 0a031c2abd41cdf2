"""`whisper-lora serve --ray`: the same server on Ray Serve, model replicas behind one gateway.

Two deployments in one Serve application:

* `Gateway`, the HTTP ingress, runs `api.create_app` unchanged (routes, auth, upload limit, OpenAI errors,
  SSE, the /v1/realtime WebSocket) over a `RemoteService` instead of the in-process `TranscriptionService`.
* `AdapterReplica`, `--replicas N` of them (or autoscaled), each holding a `TranscriptionService` (the model
  pool and the batcher: requests on one replica still batch together) and a `serve.multiplexed` adapter
  cache of `--max-adapters-per-replica`.

Why two tiers: Ray's proxy chooses a replica from the request's headers before any app reads its body, and
OpenAI's clients name the model in the multipart body. The gateway reads it and calls the replicas with it
as the multiplexed model id.

Why a router of our own (`StickyAdapterRouter`, on Serve's public request-router API): Ray's default one
learns which replica holds an adapter from a broadcast that arrives after the response (0.06-0.13 s later,
measured on this machine), so requests sent back to back went to the wrong replica and reloaded adapters
(9 loads for 14 requests over 3 adapters and 2 replicas; 5 with this router). It remembers where it sent
each adapter, so requests for one adapter keep reaching the replica that loaded it.
"""
from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import tempfile
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import FIFOMixin, MultiplexMixin, RequestRouter

from ..audio_ctx import parse_audio_ctx
from ..config import ServeConfig
from ..decode import DecodeOptions
from ..serve.service import Busy, Held, OpensStreams

APP_NAME = "whisper-lora"
RESOLVE_SECONDS = 2.0  # how long the gateway trusts a model name it resolved (RemoteService.resolve)
log = logging.getLogger("whisper_lora.serve")


def adapters_per_replica(config: ServeConfig) -> int:
    return config.max_adapters_per_replica or config.max_adapters


# ---- routing ----------------------------------------------------------------------------------------------

class StickyAdapterRouter(FIFOMixin, MultiplexMixin, RequestRouter):
    """Ranks replicas for a request naming an adapter: those this router sent it to (an LRU of the
    replica's size per replica, as its multiplexer keeps them), else those the controller says hold it;
    then the replicas holding the fewest adapters; then the rest. Requests for the base go anywhere."""

    def initialize_state(self, max_models_per_replica: int = 1):
        self._size = max_models_per_replica
        self._sent: dict = {}  # replica id -> OrderedDict of adapter ids, least recently sent first

    def _held(self, replica) -> set[str]:
        sent = self._sent.get(replica.replica_id)
        return set(sent) if sent is not None else set(replica.multiplexed_model_ids)

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # every rank full: back off, do not spin
        adapter = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        replicas = random.sample(candidate_replicas, len(candidate_replicas))
        if not adapter:
            return [replicas]
        held = {r.replica_id: self._held(r) for r in replicas}
        holders = [r for r in replicas if adapter in held[r.replica_id]]
        others = [r for r in replicas if adapter not in held[r.replica_id]]
        fewest = min((len(held[r.replica_id]) for r in others), default=0)
        return [holders, [r for r in others if len(held[r.replica_id]) == fewest], others]

    def on_request_routed(self, pending_request, replica_id, result):
        adapter = pending_request.metadata.multiplexed_model_id
        if adapter:
            sent = self._sent.setdefault(replica_id, OrderedDict())
            sent[adapter] = None
            sent.move_to_end(adapter)
            while len(sent) > self._size:
                sent.popitem(last=False)

    def on_replica_actor_died(self, replica_id):
        self._sent.pop(replica_id, None)
        super().on_replica_actor_died(replica_id)


# ---- the model replicas ------------------------------------------------------------------------------------

class AdapterReplica:
    """One model replica: a TranscriptionService, and Serve's adapter multiplexer in front of its pool."""

    async def __init__(self, config: dict):
        from .serve import build_service

        self.config = ServeConfig(**config)
        size = adapters_per_replica(self.config)
        # the pool keeps as many adapters as the multiplexer does, and unloads the same least recently used one
        # (never while a call still uses it)
        self.service = await asyncio.to_thread(build_service, replace(self.config, max_adapters=size))
        self.replica = serve.get_replica_context().replica_id.unique_id
        pool = self.service.pool

        async def load(adapter: str) -> str:
            await asyncio.to_thread(pool.preload, adapter)
            return adapter  # a str: nothing for Serve to call on eviction, the pool unloads it

        # applied per instance, so that the size can come from the command line
        self.hold = serve.multiplexed(max_num_models_per_replica=size)(load)

    async def _hold_requested(self) -> None:
        adapter = serve.get_multiplexed_model_id()
        if adapter:
            await self.hold(adapter)

    def note(self, model: str | None, kind: str) -> dict:
        """Who ran a call and what it holds: the gateway's per-replica metrics are made of these."""
        pool = self.service.pool
        return {"replica": self.replica, "model": model or "", "kind": kind, "loaded": pool.loaded_adapters,
                "loads": list(pool.load_history)}

    def describe(self) -> dict:
        return {"languages": self.service.backend.languages, "streams_alignatt": self.service.streams_alignatt,
                "has_token_logprobs": self.service.has_token_logprobs}

    def token_bytes(self, ids: list[int]) -> list[bytes]:
        return self.service.token_bytes(ids)

    def models(self):
        return self.service.models()

    def resolve(self, model: str | None) -> str | None:
        return self.service.resolve(model)

    def audio_ctx_of(self, adapter: str | None):
        return self.service.pool.audio_ctx_of(adapter)

    async def transcribe(self, audio, suffix: str | None, model: str | None, language: str | None,
                         options: DecodeOptions, vad: bool):
        """Streams (TranscriptionInfo, note), then each Segment as it is decoded. `audio` is the upload's
        bytes (a replica may run on another machine than the gateway's file) or samples."""
        await self._hold_requested()
        path = None
        if isinstance(audio, bytes):
            path = await asyncio.to_thread(_spill, audio, suffix)
        try:
            segments, info = await asyncio.to_thread(self.service.transcribe, path or audio, model, language,
                                                     options, vad)
            step = None
            try:
                yield info, self.note(model, "transcribe")
                done = object()
                while True:
                    step = asyncio.ensure_future(asyncio.to_thread(next, segments, done))
                    if (segment := await asyncio.shield(step)) is done:
                        break
                    yield segment
            finally:  # also when the gateway cancels (its client went away): frees the slot and the adapter,
                # once the decode step under way has returned (a generator cannot be closed while it runs)
                if step is not None:
                    await asyncio.wait([step])
                await asyncio.to_thread(segments.close)
        finally:
            if path:
                Path(path).unlink(missing_ok=True)

    async def stream_step(self, audio, model: str | None, language: str | None, options: DecodeOptions,
                          final: bool, start: float):
        await self._hold_requested()
        result = await asyncio.to_thread(self.service.stream_step, audio, model, language, options, final, start)
        return result, self.note(model, "stream_step")

    def check_health(self) -> None:
        batcher = self.service.batcher
        if batcher is not None and not batcher._thread.is_alive():
            raise RuntimeError("the batcher's worker thread has died")


def _spill(data: bytes, suffix: str | None) -> str:
    with tempfile.NamedTemporaryFile(suffix=suffix or "", prefix="whisper-lora-", delete=False) as file:
        file.write(data)
    return file.name


# ---- the gateway ------------------------------------------------------------------------------------------

class RemoteService(OpensStreams):
    """What `api.create_app`, realtime and metrics read from a TranscriptionService, answered by the model
    replicas. Errors raised there (unknown model, bad audio, busy) arrive as themselves."""

    batcher = None  # the replicas batch; their batch counts are theirs
    queue_depth = 0

    def __init__(self, replicas, config: ServeConfig):
        self.replicas = replicas
        self.audio_ctx = parse_audio_ctx(config.audio_ctx)
        self.stream_policy = config.policy
        described = self._call(lambda: replicas.describe.remote().result())
        self.backend = SimpleNamespace(languages=described["languages"])
        self.streams_alignatt = described["streams_alignatt"]
        self.has_token_logprobs = described["has_token_logprobs"]
        self._lock = threading.Lock()
        self._resolved: dict[str | None, tuple[str | None, float]] = {}  # name -> (adapter, until when)
        self._in_flight = 0
        self.calls: Counter = Counter()  # (model, replica, kind) -> calls run there
        self.holdings: dict[str, dict] = {}  # replica -> its last note

    # ---- what the app reads
    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def pool(self):
        return SimpleNamespace(loaded_adapters=[a for note in self.holdings.values() for a in note["loaded"]])

    def close(self) -> None:
        pass

    def models(self):
        return self._call(lambda: self.replicas.models.remote().result())

    def resolve(self, model: str | None) -> str | None:
        """The adapter a name stands for, remembered for RESOLVE_SECONDS: a request asks twice (the app's early
        404, then the call) and a realtime stream once a step, each a round trip to a replica otherwise. Only
        names that resolved are remembered; the replica resolves again when it runs the call."""
        now = time.monotonic()
        with self._lock:
            known = self._resolved.get(model)
        if known is not None and known[1] > now:
            return known[0]
        adapter = self._call(lambda: self.replicas.resolve.remote(model).result())
        with self._lock:
            self._resolved[model] = (adapter, now + RESOLVE_SECONDS)
        return adapter

    def token_bytes(self, ids: list[int]) -> list[bytes]:
        return self._call(lambda: self.replicas.token_bytes.remote(ids).result())

    def _audio_ctx(self, adapter: str | None, fallback):
        return self.audio_ctx or self._call(lambda: self.replicas.audio_ctx_of.remote(adapter).result()) or fallback

    def transcribe(self, audio, model: str | None = None, language: str | None = None,
                   options: DecodeOptions = DecodeOptions(), vad: bool = False):
        adapter = self.resolve(model)
        if isinstance(audio, (str, Path)):
            audio, suffix = Path(audio).read_bytes(), Path(audio).suffix
        else:
            suffix = None
        stream = self.replicas.options(stream=True, multiplexed_model_id=adapter or "")
        results = stream.transcribe.remote(audio, suffix, model, language, options, vad)
        self._started()
        try:
            info, note = self._call(lambda: next(results))
        except BaseException:
            results.cancel()
            self._ended()
            raise
        self._record(note)

        finished = False

        def segments():
            nonlocal finished
            while True:
                try:
                    segment = self._call(lambda: next(results))
                except StopIteration:
                    finished = True
                    return
                yield segment

        def release() -> None:
            if not finished:
                results.cancel()  # the replica's generator closes: its slot and adapter are freed
            self._ended()

        return Held(segments(), release), info

    def stream_step(self, audio, model: str | None, language: str | None, options: DecodeOptions, final: bool,
                    start: float = 0.0):
        adapter = self.resolve(model)
        handle = self.replicas.options(multiplexed_model_id=adapter or "")
        self._started()
        try:
            result, note = self._call(lambda: handle.stream_step.remote(audio, model, language, options, final,
                                                                        start).result())
        finally:
            self._ended()
        self._record(note)
        return result

    # ---- bookkeeping
    def _started(self) -> None:
        with self._lock:
            self._in_flight += 1

    def _ended(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _record(self, note: dict) -> None:
        with self._lock:
            self.calls[note["model"], note["replica"], note["kind"]] += 1
            self.holdings[note["replica"]] = note

    @staticmethod
    def _call(call):
        """A remote call; Ray's wrappers taken off what the replica raised, so the app answers it as it would
        in one process (404, 400, 429...)."""
        from ray.exceptions import RayActorError, RayTaskError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        from ..serve.errors import APIError

        try:
            return call()
        except RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, Exception):
                raise cause from None
            raise
        except BackPressureError:
            raise Busy(1.0) from None
        except (RayActorError, DeploymentUnavailableError) as exc:
            raise APIError(503, f"no model replica could take the request ({type(exc).__name__}); retry",
                           type="server_error", headers={"Retry-After": "5"}) from None

    def collect(self):
        """Prometheus collector (registered by `Metrics`): which replica ran the calls for each model, and
        what each replica held and loaded as of its last answer."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        with self._lock:
            calls, holdings = dict(self.calls), dict(self.holdings)
        ran = CounterMetricFamily("whisper_lora_replica_calls", "Model calls by model, the replica that ran them "
                                  "and kind (transcribe, stream_step)", labels=["model", "replica", "kind"])
        for (model, replica, kind), count in sorted(calls.items()):
            ran.add_metric([model, replica, kind], count)
        loaded = GaugeMetricFamily("whisper_lora_replica_adapter_loaded", "Adapters each replica held at its last "
                                   "answer", labels=["replica", "adapter"])
        loads = CounterMetricFamily("whisper_lora_replica_adapter_loads", "Adapter loads on each replica (its last "
                                    "256), as of its last answer", labels=["replica", "adapter"])
        for replica, note in sorted(holdings.items()):
            for adapter in note["loaded"]:
                loaded.add_metric([replica, adapter], 1)
            for adapter, count in sorted(Counter(note["loads"]).items()):
                loads.add_metric([replica, adapter], count)
        return [ran, loaded, loads]


@serve.ingress()
class Gateway:
    """The FastAPI app of `serve`, its model calls sent to the AdapterReplica deployment."""

    def __init__(self, replicas, config: dict):
        self.replicas, self.config = replicas, ServeConfig(**config)

    def __serve_build_asgi_app__(self):
        from ..serve.api import create_app

        config = self.config
        return create_app(lambda: RemoteService(self.replicas, config),
                          api_key=config.api_key or os.environ.get("WHISPER_LORA_API_KEY") or None,
                          max_upload_mb=config.max_upload_mb,
                          max_queue=config.max_queue * (config.max_replicas or config.replicas),
                          sentiment_model=config.sentiment_model, ui=False,
                          diarizer=config.diarizer, device=config.device)


def build_app(config: ServeConfig):
    """The Serve application: the gateway bound to the model deployment."""
    size = adapters_per_replica(config)
    if config.max_replicas is not None:
        scale = {"autoscaling_config": {"min_replicas": config.min_replicas or 0, "max_replicas": config.max_replicas,
                                        "initial_replicas": max(1, config.min_replicas or 0),
                                        "target_ongoing_requests": config.target_ongoing_requests}}
    else:
        scale = {"num_replicas": config.replicas}
    actor = {"num_cpus": config.replica_cpus, "num_gpus": config.replica_gpus}
    model = serve.deployment(AdapterReplica, name="AdapterReplica", max_ongoing_requests=config.max_queue,
                             ray_actor_options=actor, **scale,
                             request_router_config=RequestRouterConfig(
                                 request_router_class=StickyAdapterRouter,
                                 request_router_kwargs={"max_models_per_replica": size}))
    # one gateway: the client secrets it mints for browsers live in its memory
    gateway = serve.deployment(Gateway, name="Gateway", num_replicas=1, max_ongoing_requests=100_000,
                               ray_actor_options={"num_cpus": 0})
    config_dict = asdict(config)
    return gateway.bind(model.bind(config_dict), config_dict)


def run(config: ServeConfig) -> int:
    """Serve until SIGINT or SIGTERM, on this machine's Ray or the cluster --ray-address names."""
    from .transcribe_ray import connect

    address = config.ray_address or os.environ.get("RAY_ADDRESS")
    started_here = not ray.is_initialized() and address in (None, "", "local")  # "local": a new Ray, always
    connect(ray, config.ray_address)
    if config.ui:
        print("whisper-lora: --ray serves the API and /v1/realtime; the web UI is not served on Ray Serve "
              "(run `whisper-lora ui` beside it)", flush=True)
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_app(config), name=APP_NAME, route_prefix="/", blocking=False)
    replicas = (f"{config.min_replicas or 0}-{config.max_replicas} (autoscaled)" if config.max_replicas
                else str(config.replicas))
    print(f"whisper-lora: serving on http://{config.host}:{config.port} on Ray Serve: {replicas} model replicas, "
          f"{adapters_per_replica(config)} adapters each (OpenAI API under /v1; /health says when the model is "
          "loaded)", flush=True)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(1.0):  # signals are handled between waits
        pass
    print("whisper-lora: stopping the Serve application", flush=True)
    serve.delete(APP_NAME)
    if started_here:
        serve.shutdown()
        ray.shutdown()
    return 0
