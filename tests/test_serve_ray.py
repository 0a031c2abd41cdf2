"""`whisper-lora serve --ray` as users run it: the CLI starts a local Ray, a gateway and 2 model replicas
holding at most 1 adapter each, with 3 adapters to serve; the official `openai` client against it, the
single-process `serve` (the `server` fixture) as the reference."""
from __future__ import annotations

import re
import shutil
from collections import defaultdict

import pytest

from conftest import KEY, SPEECH_EN, start_server

openai = pytest.importorskip("openai")
pytest.importorskip("ray.serve")

ARCTIC = SPEECH_EN / "arctic_a0009.wav"
ADAPTERS = ("a", "b", "c")


@pytest.fixture
def ray_server(mandarin_adapter, tmp_path, monkeypatch):
    # a Ray of its own: ray.init() alone joins any cluster `ray start` left running (test_batch.py's two
    # nodes may be up on the other pytest worker, and go away mid-test)
    monkeypatch.setenv("RAY_ADDRESS", "local")
    folder = tmp_path / "adapters"
    for name in ADAPTERS:  # the same weights under three names: three adapters to place, one reference text
        shutil.copytree(mandarin_adapter[0], folder / name)
    server = start_server(tmp_path, "--ray", "--adapters", str(folder), "--replicas", "2",
                          "--max-adapters-per-replica", "1", "--replica-cpus", "0.5", "--api-key", KEY,
                          "--max-upload-mb", "1", timeout=300)
    yield server
    server.stop()
    log = server.log.read_text()
    assert server.process.returncode == 0 and "Traceback" not in log, log[-3000:]


def samples(text: str, name: str, *labels: str) -> dict[tuple, float]:
    """A Prometheus family's samples by the values of `labels`, in that order."""
    found = {}
    for line in text.splitlines():
        if match := re.fullmatch(name + r"\{(.*)\} (\S+)", line):
            values = dict(re.findall(r'(\w+)="([^"]*)"', match[1]))
            found[tuple(values[label] for label in labels)] = float(match[2])
    return found


def test_serve_on_ray_routes_adapters_to_their_replica_and_answers_as_one_process(ray_server, server,
                                                                                  mandarin_adapter, tmp_path):
    """One test, so that one pytest worker starts the cluster (Ray and two model replicas: ~30 s)."""
    from test_realtime import stream, transcripts
    from whisper_lora.audio import load_audio
    from whisper_lora.text import error_rate

    reference, ours = server.client(), ray_server.client()
    # ---- the base model, every response format: the single-process server's answers
    for fmt in ("json", "verbose_json", "srt", "text"):
        expected, got = (client.audio.transcriptions.create(file=open(ARCTIC, "rb"), model="whisper-1", language="en",
                                                            response_format=fmt) for client in (reference, ours))
        if fmt == "verbose_json":  # the replica computes with fewer threads: log-probs to float rounding
            got, expected = got.model_dump(), expected.model_dump()
            for mine, theirs in zip(got["segments"], expected["segments"], strict=True):
                assert mine.pop("avg_logprob") == pytest.approx(theirs.pop("avg_logprob"), abs=1e-4)
        assert got == expected, fmt

    # ---- three adapters, two replicas, one adapter each, requests back to back (no waiting for Ray's view)
    row = mandarin_adapter[1][0]
    expected_zh = reference.audio.transcriptions.create(file=open(row["audio"]["path"], "rb"), model="mandarin",
                                                        language="zh").text
    order = list("ababab") + list("ccc")
    for model in order:
        got = ours.audio.transcriptions.create(file=open(row["audio"]["path"], "rb"), model=model, language="zh")
        assert got.text == expected_zh, model
    metrics = ray_server.get("/metrics")[1]
    calls = samples(metrics, "whisper_lora_replica_calls_total", "model", "replica", "kind")
    ran_on = defaultdict(set)
    for model, replica, kind in calls:
        ran_on[model].add(replica)
    holder = {name: ran_on[name] for name in ADAPTERS}
    assert all(len(replicas) == 1 for replicas in holder.values()), holder  # each adapter on one replica
    (ra,), (rb,), (rc,) = holder["a"], holder["b"], holder["c"]
    assert ra != rb and rc in (ra, rb)  # b went to the empty replica; c replaced one of the two
    assert sum(calls[name, holder[name].copy().pop(), "transcribe"] for name in ADAPTERS) == len(order)
    # each replica loaded only the adapters it served, once each: 3 loads for 9 requests
    loads = samples(metrics, "whisper_lora_replica_adapter_loads_total", "replica", "adapter")
    assert loads == {(replica, name): 1.0 for name in ADAPTERS for replica in holder[name]}
    kept = ("a", ra) if rc == rb else ("b", rb)
    assert samples(metrics, "whisper_lora_replica_adapter_loaded", "replica", "adapter") == {(rc, "c"): 1.0, (kept[1], kept[0]): 1.0}

    # ---- SSE through the client: the deltas join into the done event's text, the same text
    events = list(ours.audio.transcriptions.create(file=open(row["audio"]["path"], "rb"), model="c", language="zh",
                                                   stream=True))
    assert events[-1].type == "transcript.text.done" and events[-1].text == expected_zh
    assert "".join(e.delta for e in events if e.type == "transcript.text.delta") == expected_zh

    # ---- realtime: the WebSocket ends at the gateway, every decoding step runs on the adapter's replica
    row = mandarin_adapter[1][1]
    text = "".join(transcripts(stream(ray_server, load_audio(row["audio"]["path"]), kept[0], "zh", speed=2.0)))
    assert error_rate([row["sentence"]], [text], "cer", ["zh"]) < 0.5, text  # the adapter's text, not the base's
    steps = {(replica, count) for (model, replica, kind), count in
             samples(ray_server.get("/metrics")[1], "whisper_lora_replica_calls_total", "model", "replica", "kind").items()
             if model == kept[0] and kind == "stream_step"}
    assert [replica for replica, _ in steps] == [kept[1]], steps  # its holder, which did not load it again

    # ---- errors: the same status and body as one process's, and the server lives on
    (tmp_path / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" * 10)
    big = tmp_path / "big.wav"
    big.write_bytes(ARCTIC.read_bytes() * 12)  # 1.2 MB > the 1 MB limit
    for key, path, request in ((KEY, ARCTIC, dict(model="nope")), (KEY, ARCTIC, dict(model="whisper-1", language="xx")),
                               (KEY, tmp_path / "broken.wav", dict(model="whisper-1")),
                               (KEY, big, dict(model="whisper-1")), ("wrong", ARCTIC, dict(model="whisper-1"))):
        answers = []
        for target in (server, ray_server):
            with pytest.raises(openai.APIStatusError) as exc:
                target.client(key=key).audio.transcriptions.create(file=open(path, "rb"), **request)
            body = dict(exc.value.body, message=exc.value.body["message"].split("; this server has:")[0])
            answers.append((exc.value.status_code, body))  # (the list of models differs: a, b, c here)
        assert answers[1] == answers[0], request
    assert ray_server.get("/health")[0] == 200
    assert samples(ray_server.get("/metrics")[1], "whisper_lora_replica_adapter_loads_total", "replica", "adapter") == loads


def test_remote_errors_arrive_as_the_replicas_raised_them():
    """Ray wraps what a replica raises; the gateway answers what was raised (Busy -> 429 with Retry-After)."""
    from ray.exceptions import RayTaskError
    from ray.serve.exceptions import BackPressureError

    from whisper_lora.serve.errors import as_api_error
    from whisper_lora.stages.serve_ray import RemoteService
    from whisper_lora.serve.service import Busy, UnknownModel

    def raises(exc):
        def call():
            raise exc
        return call

    wrapped = RayTaskError("transcribe", "Traceback: ...", Busy(7.0)).as_instanceof_cause()
    with pytest.raises(Busy) as busy:
        RemoteService._call(raises(wrapped))
    error = as_api_error(busy.value)
    assert error.status == 429 and error.headers == {"Retry-After": "7"} and "Traceback" not in error.message
    with pytest.raises(UnknownModel, match="^model 'x'"):
        RemoteService._call(raises(RayTaskError("resolve", "tb", UnknownModel("model 'x' does not exist"))
                                   .as_instanceof_cause()))
    with pytest.raises(Busy):
        RemoteService._call(raises(BackPressureError(num_queued_requests=3, max_queued_requests=3)))


def test_ray_serve_options_are_checked():
    from whisper_lora.config import ServeConfig
    from whisper_lora.errors import UserError

    for bad in (dict(min_replicas=1), dict(replicas=2, max_replicas=3), dict(min_replicas=4, max_replicas=2),
                dict(replicas=0), dict(max_adapters_per_replica=0)):
        with pytest.raises(UserError):
            ServeConfig(ray=True, **bad).validate()
    ServeConfig(ray=True, min_replicas=0, max_replicas=4).validate()
