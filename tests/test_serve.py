"""`whisper-lora serve` as users meet it: a real server process on 127.0.0.1, the official `openai` client."""
from __future__ import annotations

import math
import shutil
import signal
import threading
import time
import warnings
from contextlib import contextmanager

import pytest

from conftest import SPEECH_EN, start_server

openai = pytest.importorskip("openai")

ARCTIC = SPEECH_EN / "arctic_a0009.wav"


def test_models_lists_the_base_and_every_adapter(server):
    client = server.client()
    ids = [m.id for m in client.models.list()]
    assert ids[:2] == ["whisper-1", "openai/whisper-base"] and "mandarin" in ids
    assert client.models.retrieve("mandarin").owned_by == "whisper-lora"
    assert server.get("/health")[0] == 200


def test_every_response_format_as_the_client_parses_it(server, tmp_path):
    import srt
    import webvtt

    from conftest import conversation_clip

    clip, onsets = conversation_clip(tmp_path)
    client = server.client()
    plain = client.audio.transcriptions.create(file=open(ARCTIC, "rb"), model="whisper-1", language="en")
    assert "gregson" in plain.text.lower() and plain.usage.seconds == pytest.approx(3.1, abs=0.1)
    text = client.audio.transcriptions.create(file=open(ARCTIC, "rb"), model="whisper-1", language="en",
                                              response_format="text")
    assert isinstance(text, str) and text.strip() == plain.text
    fitted = client.audio.transcriptions.create(file=open(ARCTIC, "rb"), model="whisper-1", language="en",
                                                extra_body={"audio_ctx": "auto"})  # ours: a 10 s encoder context
    assert fitted.text == plain.text
    cues = list(srt.parse(client.audio.transcriptions.create(file=open(clip, "rb"), model="whisper-1", language="en",
                                                             response_format="srt")))
    assert [round(c.start.total_seconds()) for c in cues] == [round(t) for t in onsets]
    vtt = client.audio.transcriptions.create(file=open(clip, "rb"), model="whisper-1", language="en",
                                             response_format="vtt")
    (tmp_path / "c.vtt").write_text(vtt)
    assert [c.text for c in webvtt.read(str(tmp_path / "c.vtt"))] == [c.content for c in cues]
    verbose = client.audio.transcriptions.create(file=open(clip, "rb"), model="whisper-1", response_format="verbose_json",
                                                 timestamp_granularities=["word", "segment"],
                                                 extra_body={"sentiment": True})
    assert verbose.language == "english" and verbose.duration == pytest.approx(21.7, abs=0.2)
    assert verbose.sentiment["label"] in ("positive", "negative", "neutral")  # ours, beside OpenAI's fields
    assert all(s.sentiment["label"] in ("positive", "negative", "neutral") for s in verbose.segments)
    assert len(verbose.segments) == len(onsets)
    for segment in verbose.segments:
        assert isinstance(segment.seek, int) and isinstance(segment.tokens, list) and segment.tokens
        assert -2 < segment.avg_logprob < 0 and 0 <= segment.no_speech_prob < 1 and segment.compression_ratio > 0
    words = verbose.words
    assert " ".join(w.word for w in words).lower().startswith("he turned sharply")
    assert all(0 <= w.start <= w.end <= verbose.duration for w in words)
    assert [w.start for w in words] == sorted(w.start for w in words)


def test_streaming_sends_each_segment_as_a_delta_then_the_whole_text(server, tmp_path):
    from conftest import conversation_clip

    clip, onsets = conversation_clip(tmp_path)
    client = server.client()
    events = list(client.audio.transcriptions.create(file=open(clip, "rb"), model="whisper-1", language="en",
                                                     stream=True))
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    (done,) = [e for e in events if e.type == "transcript.text.done"]
    assert len(deltas) == len(onsets) and events[-1] is done
    assert "".join(deltas) == done.text
    whole = client.audio.transcriptions.create(file=open(clip, "rb"), model="whisper-1", language="en",
                                               response_format="verbose_json")
    assert done.text == whole.text and deltas == [s.text if i == 0 else " " + s.text for i, s in enumerate(whole.segments)]
    # OpenAI's token usage on the done event: the encoder positions the audio filled, the tokens decoded
    assert done.usage.type == "tokens" and done.usage.input_tokens == math.ceil(whole.duration * 50)
    assert done.usage.output_tokens == sum(len(s.tokens) for s in whole.segments) > 0
    assert done.usage.total_tokens == done.usage.input_tokens + done.usage.output_tokens


def test_translation(server):
    client = server.client()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the client marks translations deprecated
        english = client.audio.translations.create(file=open(ARCTIC, "rb"), model="whisper-1")
        verbose = client.audio.translations.create(file=open(ARCTIC, "rb"), model="whisper-1",
                                                   response_format="verbose_json")
    assert "gregson" in english.text.lower()
    assert verbose.language == "english" and verbose.segments and verbose.text == english.text


def test_an_adapter_chosen_by_name_transcribes_its_own_data_better(server, mandarin_adapter):
    from whisper_lora.text import error_rate

    client = server.client()
    rows = mandarin_adapter[1][:2]
    base, tuned = [], []
    for row in rows:
        for model, out in (("whisper-1", base), ("mandarin", tuned)):
            out.append(client.audio.transcriptions.create(file=open(row["audio"]["path"], "rb"), model=model,
                                                          language="zh").text)
    references = [r["sentence"] for r in rows]
    assert base != tuned
    assert error_rate(references, tuned, "cer", ["zh"] * 2) < 0.5 * error_rate(references, base, "cer", ["zh"] * 2)


@contextmanager
def in_process_server(service, **app_options):
    """The real app in a uvicorn thread of this process, so a test can reach the service (pause its batcher)
    and stop the server as SIGTERM does (uvicorn's own handle_exit)."""
    import uvicorn

    from conftest import KEY, Server, free_port
    from whisper_lora.serve.api import create_app

    port = free_port()
    app_server = uvicorn.Server(uvicorn.Config(create_app(lambda: service, api_key=KEY, **app_options),
                                               host="127.0.0.1", port=port, log_level="warning",
                                               timeout_graceful_shutdown=None))
    thread = threading.Thread(target=app_server.run, daemon=True)
    thread.start()
    server = Server(f"http://127.0.0.1:{port}", None, None)
    while server_status(server) != 200:
        assert thread.is_alive(), "the in-process server stopped"
        time.sleep(0.2)
    try:
        yield server, app_server, thread
    finally:
        app_server.should_exit = True
        thread.join(timeout=60)


@pytest.fixture
def lockstep_server(adapters_dir):
    """The server over a service whose batcher the test can pause and whose partial batches wait for every
    request under way however long it takes (no clock)."""
    import math

    from whisper_lora.serve.service import ModelPool, TranscriptionService

    service = TranscriptionService(ModelPool(None, str(adapters_dir)), max_wait=math.inf)
    with in_process_server(service) as (server, _, _):
        yield server, service


def server_status(server) -> int | None:
    try:
        return server.get("/health")[0]
    except OSError:
        return None


def test_concurrent_requests_for_base_and_adapter_are_batched_and_each_gets_its_own_text(lockstep_server,
                                                                                       mandarin_adapter):
    """Requests for different adapters sent together are decoded in shared batches (one per adapter, the
    default), and every request gets exactly what it gets alone. The batcher is paused until all four
    have handed in their audio, so the batches do not depend on how soon the requests arrive."""
    from concurrent.futures import ThreadPoolExecutor

    server, service = lockstep_server
    client = server.client()
    english = [(SPEECH_EN / "cards" / f"00{n}.wav", "whisper-1", "en") for n in (1, 3)]
    mandarin = [(row["audio"]["path"], "mandarin", "zh") for row in mandarin_adapter[1][4:6]]
    jobs = [job for pair in zip(english, mandarin) for job in pair]

    def transcribe(job):
        return client.audio.transcriptions.create(file=open(job[0], "rb"), model=job[1], language=job[2]).text

    alone = [transcribe(job) for job in jobs]
    batcher = service.batcher
    batcher.recent.clear()
    with ThreadPoolExecutor(len(jobs)) as pool:
        with batcher.paused():
            futures = [pool.submit(transcribe, job) for job in jobs]
            assert batcher.wait_until(lambda b: b.depth == len(jobs) or any(f.done() for f in futures), timeout=300)
        together = [f.result() for f in futures]
    assert together == alone
    batches = sorted((op, sorted(adapters)) for op, adapters in batcher.recent)
    assert batches == sorted((op, [name] * 2) for op in ("encode", "decode") for name in ("__base__", "mandarin"))


def test_an_adapter_folder_added_later_is_served_without_a_restart(server, adapters_dir):
    client = server.client()
    shutil.copytree(adapters_dir / "mandarin", adapters_dir / "mandarin-copy")
    assert "mandarin-copy" in [m.id for m in client.models.list()]
    assert client.audio.transcriptions.create(file=open(ARCTIC, "rb"), model="mandarin-copy", language="en").text


def test_errors_come_in_openai_shape_as_the_clients_own_exceptions(server, tmp_path):
    client = server.client()
    with pytest.raises(openai.NotFoundError) as exc:
        client.audio.transcriptions.create(file=open(ARCTIC, "rb"), model="../mandarin")
    assert exc.value.code == "model_not_found" and "whisper-1" in exc.value.message  # names what exists
    (tmp_path / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" * 10)
    with pytest.raises(openai.BadRequestError) as exc:
        client.audio.transcriptions.create(file=open(tmp_path / "broken.wav", "rb"), model="whisper-1")
    assert exc.value.param == "file" and "broken.wav" in exc.value.message and "upload-" not in exc.value.message
    for bad, param in ((dict(language="xx"), "language"), (dict(response_format="docx"), "response_format"),
                       (dict(temperature=3.0), "temperature"), (dict(timestamp_granularities=["word"]), "timestamp_granularities"),
                       (dict(extra_body={"audio_ctx": "half"}), "audio_ctx")):
        with pytest.raises(openai.BadRequestError) as exc:
            client.audio.transcriptions.create(file=open(ARCTIC, "rb"), model="whisper-1", **bad)
        assert exc.value.param == param
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").audio.transcriptions.create(file=open(ARCTIC, "rb"), model="whisper-1")
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").models.list()
    big = tmp_path / "big.wav"
    big.write_bytes(ARCTIC.read_bytes() * 12)  # 1.2 MB > the 1 MB limit
    with pytest.raises(openai.APIStatusError) as exc:
        client.audio.transcriptions.create(file=open(big, "rb"), model="whisper-1")
    assert exc.value.status_code == 413 and exc.value.code == "file_too_large"
    # and the server still serves; a form field it does not know is ignored, as OpenAI's API does
    assert "gregson" in client.audio.transcriptions.create(file=open(ARCTIC, "rb"), model="whisper-1",
                                                           extra_body={"made_up_field": "1"}).text.lower()


def test_metrics_in_prometheus_text(server):
    status, text = server.get("/metrics")
    assert status == 200
    assert 'whisper_lora_requests_total{endpoint="/v1/audio/transcriptions",status="200"}' in text
    assert 'whisper_lora_request_duration_seconds_bucket{endpoint="/v1/audio/transcriptions",le="+Inf"}' in text
    assert "whisper_lora_queue_depth " in text
    seconds = [ln for ln in text.splitlines() if ln.startswith('whisper_lora_audio_seconds_total{model="whisper-1"}')]
    assert seconds and float(seconds[0].split()[-1]) > 20


def test_a_full_queue_answers_429_and_shutdown_finishes_the_request_in_flight(tiny_model_dir):
    """max_queue 1: a second request while one is in flight gets 429 with Retry-After; shutting down (what
    uvicorn does on SIGTERM) lets the request in flight finish with its answer before the server exits. The
    first request is held in the paused batcher, so "in flight" does not depend on how long it takes."""
    from whisper_lora.serve.service import ModelPool, TranscriptionService

    service = TranscriptionService(ModelPool(str(tiny_model_dir)), max_wait=0.05, max_queue=1)
    with in_process_server(service, max_queue=1) as (server, app_server, thread):
        client = server.client()
        answers = []
        with service.batcher.paused():
            worker = threading.Thread(target=lambda: answers.append(client.audio.transcriptions.create(
                file=open(ARCTIC, "rb"), model="whisper-1", language="en", temperature=0.5)))
            worker.start()
            assert service.batcher.wait_until(lambda b: b.depth == 1, timeout=120)  # admitted, its work queued
            with pytest.raises(openai.RateLimitError) as exc:
                client.audio.transcriptions.create(file=open(ARCTIC, "rb"), model="whisper-1")
            assert int(exc.value.response.headers["retry-after"]) >= 1
            app_server.handle_exit(signal.SIGTERM, None)  # uvicorn's SIGTERM handler
            thread.join(timeout=2)
            assert thread.is_alive() and not answers  # still serving the request it holds
        worker.join(timeout=120)
        thread.join(timeout=60)
        assert len(answers) == 1 and isinstance(answers[0].text, str)  # answered, not cut off
        assert not thread.is_alive()  # and then the server is gone


def test_sigterm_stops_an_idle_server_in_order(tiny_model_dir, tmp_path):
    server = start_server(tmp_path, "--model", str(tiny_model_dir))
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn exits by the signal it caught
    log = server.log.read_text()
    assert "Shutting down" in log and "Application shutdown complete" in log and "Traceback" not in log


def test_an_error_mid_stream_is_an_openai_error_event_the_client_raises():
    """After the first delta the status line is sent: the error travels as OpenAI's error event, which the
    official client's stream raises as APIError (the events before it arrive first)."""
    import asyncio
    from types import SimpleNamespace

    import httpx

    from whisper_lora.decode import Segment, TranscriptionInfo
    from whisper_lora.errors import UserError
    from whisper_lora.serve.api import ServerState, _events

    def segments():
        yield Segment(0, 0.0, 1.0, "hello", tokens=[1, 2])
        raise UserError("the decoder gave up", "upload.wav")

    class Stored:
        name = "mine.wav"

        def remove(self):
            pass

    async def body():
        parsed = SimpleNamespace(model="whisper-1", logprobs=False, response_format="json")
        return b"".join([chunk async for chunk in _events(ServerState(), parsed, segments(),
                                                          TranscriptionInfo("en", 1.0, 2.0), Stored())])

    response = httpx.Response(200, content=asyncio.run(body()), headers={"content-type": "text/event-stream"},
                              request=httpx.Request("POST", "http://127.0.0.1/v1/audio/transcriptions"))
    stream = openai.Stream(cast_to=object, response=response,
                           client=openai.OpenAI(api_key="x", base_url="http://127.0.0.1/v1"))
    received = []
    with pytest.raises(openai.APIError) as exc:
        for event in stream:
            received.append(event)
    assert received == [{"type": "transcript.text.delta", "delta": "hello"}]
    assert "the decoder gave up" in exc.value.message and exc.value.body["code"] == "invalid_value"


def test_logprobs_of_every_token_on_json_and_on_the_stream(server, mandarin_adapter):
    """include[]=logprobs in OpenAI's shape: each text token, its bytes (a Chinese character can span two
    tokens: the bytes join into the text where the tokens' own strings cannot), its log-probability."""
    client = server.client()
    row = mandarin_adapter[1][0]
    plain = client.audio.transcriptions.create(file=open(row["audio"]["path"], "rb"), model="mandarin",
                                               language="zh", include=["logprobs"])
    assert plain.logprobs and all(lp.logprob <= 0 for lp in plain.logprobs)
    assert bytes(int(b) for lp in plain.logprobs for b in lp.bytes).decode().strip() == plain.text
    # streamed: each delta carries its segment's, the done event all of them; a token each (same decode as
    # verbose_json's, whose text tokens they are)
    events = list(client.audio.transcriptions.create(file=open(ARCTIC, "rb"), model="whisper-1", language="en",
                                                     stream=True, include=["logprobs"]))
    verbose = client.audio.transcriptions.create(file=open(ARCTIC, "rb"), model="whisper-1", language="en",
                                                 response_format="verbose_json")
    done = events[-1]
    deltas = [lp for e in events if e.type == "transcript.text.delta" for lp in e.logprobs]
    assert [lp.model_dump() for lp in deltas] == [lp.model_dump() for lp in done.logprobs]
    assert len(done.logprobs) == sum(len(s.tokens) for s in verbose.segments)
    assert bytes(int(b) for lp in done.logprobs for b in lp.bytes).decode().strip() == done.text
    with pytest.raises(openai.BadRequestError) as exc:
        client.audio.transcriptions.create(file=open(ARCTIC, "rb"), model="whisper-1", include=["logprobs"],
                                           response_format="verbose_json")
    assert exc.value.param == "include"


def test_segments_release_their_slot_once_however_the_call_ends():
    from whisper_lora.decode import Segment
    from whisper_lora.serve.service import Held

    def decoded(fail: bool = False):
        yield Segment(0, 0.0, 1.0, "one")
        if fail:
            raise RuntimeError("decoder died")
        yield Segment(1, 1.0, 2.0, "two")

    released = []
    unread = Held(decoded(), lambda: released.append("unread"))
    unread.close()  # closed before its first segment: a generator's own `finally` would not run here
    unread.close()
    whole = Held(decoded(), lambda: released.append("whole"))
    assert [s.text for s in whole] == ["one", "two"]
    broken = Held(decoded(fail=True), lambda: released.append("broken"))
    with pytest.raises(RuntimeError):
        list(broken)
    assert released == ["unread", "whole", "broken"]


def test_a_stream_whose_client_left_before_its_first_byte_frees_its_slot_and_upload(tmp_path):
    import asyncio
    from types import SimpleNamespace

    from whisper_lora.decode import Segment
    from whisper_lora.serve.api import EventStream, _closer
    from whisper_lora.serve.service import Held

    released = []
    segments = Held(iter([Segment(0, 0.0, 1.0, "never sent")]), lambda: released.append("slot"))
    upload = tmp_path / "upload.wav"
    upload.write_bytes(b"RIFF")
    close = _closer(segments, SimpleNamespace(name="a.wav", remove=lambda: upload.unlink(missing_ok=True)))

    async def body():  # never iterated: the response start fails first
        yield b"data: {}\n\n"

    async def gone(message):
        raise OSError("the client went away")

    async def receive():
        return {"type": "http.disconnect"}

    with pytest.raises(Exception):
        asyncio.run(EventStream(body(), close)({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, gone))
    assert released == ["slot"] and not upload.exists()
    asyncio.run(close())  # the body's own `finally`, had it run: nothing is released twice
    assert released == ["slot"]
