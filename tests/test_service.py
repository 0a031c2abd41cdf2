"""The model pool and the batcher, on the tiny random Whisper with random LoRA adapters (fast)."""
from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from whisper_lora.decode import DecodeOptions, TransformersBackend, join_text
from whisper_lora.errors import UserError
from whisper_lora.lora import apply_lora, save_adapter
from whisper_lora.models import load_model
from whisper_lora.serve.service import ModelPool, TranscriptionService, UnknownModel

OPTIONS = DecodeOptions(temperature=(0.0,), without_timestamps=True, max_new_tokens=12)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    """Three LoRA adapters of the tiny model whose B matrices are far from zero: each changes the text."""
    folder = tmp_path_factory.mktemp("tiny-adapters")
    for seed, name in enumerate(["one", "two", "three"]):
        model, processor = load_model(str(tiny_model_dir))
        peft_model = apply_lora(model, 4, 8, 0.0, ["q_proj", "v_proj", "fc1"])
        torch.manual_seed(seed)
        with torch.no_grad():
            for param_name, param in peft_model.named_parameters():
                if "lora_B" in param_name:
                    param.normal_(0, 0.5)
        save_adapter(peft_model, processor, folder / name, str(tiny_model_dir))
    return folder


@pytest.fixture(scope="module")
def clips():
    rng = np.random.default_rng(0)
    return [(rng.standard_normal(16000 * 2) * 0.1).astype(np.float32) for _ in range(2)]


def alone(tiny_model_dir, adapter_folder, clip) -> str:
    """What a model with only this adapter (plain peft, its one adapter active) transcribes: the reference."""
    model, processor = load_model(str(adapter_folder) if adapter_folder else str(tiny_model_dir))
    (segments, info), = TransformersBackend(model, processor, device="cpu").transcribe_batch([clip], ["en"], OPTIONS)
    return join_text(segments, info.language)


def run_together(service: TranscriptionService, calls) -> list:
    """Run `calls` (functions of no argument, each one transcription) in threads that meet at the batcher:
    it is paused until every call has handed in its first piece of work, so the batches that follow
    depend on which calls are under way, never on how fast a thread got there."""
    batcher = service.batcher
    with ThreadPoolExecutor(len(calls)) as threads, batcher.paused():
        futures = [threads.submit(call) for call in calls]
        assert batcher.wait_until(lambda b: b.depth == len(calls) or any(f.done() for f in futures), timeout=300)
    return [f.result() for f in futures]


def test_concurrent_calls_for_different_adapters_each_get_their_own_text(tiny_model_dir, adapters, clips):
    pool = ModelPool(str(tiny_model_dir), str(adapters), max_adapters=4, device="cpu")
    service = TranscriptionService(pool, max_queue=16, mixed_adapters=True, max_wait=math.inf)  # the harder path
    try:
        names = [None, "one", "two", "three"]
        expected = {name: [alone(tiny_model_dir, adapters / name if name else None, c) for c in clips] for name in names}
        assert len({tuple(v) for v in expected.values()}) == 4  # every adapter really changes the text
        jobs = [(name, i) for name in names for i in range(len(clips))]

        def run(job):
            segments, info = service.transcribe(clips[job[1]], job[0], "en", OPTIONS)
            return join_text(list(segments), info.language)

        got = run_together(service, [lambda job=job: run(job) for job in jobs])
        assert got == [expected[name][i] for name, i in jobs]
        # all eight calls in one encoding batch and one decoding batch, each row with its own adapter
        rows = {op: sorted(adapters) for op, adapters in service.batcher.recent}
        assert list(rows) == ["encode", "decode"] and len(service.batcher.recent) == 2
        assert rows["encode"] == rows["decode"] == sorted(["__base__", "one", "two", "three"] * 2)
        assert pool.peft is not None and set(pool.loaded_adapters) == {"one", "two", "three"}
    finally:
        service.close()


def test_a_partial_batch_waits_for_the_calls_under_way_not_for_the_clock(tiny_model_dir, clips):
    """Two calls on the base model, the worker paused until both queued: one batch of two, then none of
    one. Without a time limit the second call's work is always waited for, however late it comes."""
    service = TranscriptionService(ModelPool(str(tiny_model_dir), device="cpu"), max_wait=math.inf)
    try:
        def run(clip):
            segments, info = service.transcribe(clip, None, "en", OPTIONS)
            return join_text(list(segments), info.language)

        run_together(service, [lambda c=c: run(c) for c in clips])
        assert [(op, len(adapters)) for op, adapters in service.batcher.recent] == [("encode", 2), ("decode", 2)]
    finally:
        service.close()


def test_least_recently_used_idle_adapters_are_unloaded(tiny_model_dir, adapters, clips):
    pool = ModelPool(str(tiny_model_dir), str(adapters), max_adapters=2)
    for name in ("one", "two", "one"):  # "one" used last: "two" is now the least recently used
        with pool.using(name):
            pass
    assert pool.loaded_adapters == ["two", "one"]
    with pool.using("three"):
        assert pool.loaded_adapters == ["one", "three"]
    assert "two" not in pool.peft.peft_config  # unloaded from the model, not only from the list
    with pool.using("one"), pool.using("three"), pool.using("two"):  # all in use: over the limit for now
        assert set(pool.loaded_adapters) == {"one", "two", "three"}
    assert len(pool.loaded_adapters) == 2  # back to the limit once the calls ended


def test_names_never_become_paths_and_unknown_names_list_what_exists(tiny_model_dir, adapters):
    pool = ModelPool(str(tiny_model_dir), str(adapters))
    for name in ("../one", str(adapters / "one"), "one/..", "nope"):
        with pytest.raises(UnknownModel, match="whisper-1, .*one, three, two"):
            pool.resolve(name)
    assert pool.resolve("whisper-1") is None and pool.resolve(pool.base_name) is None
    assert pool.resolve("two") == "two"


def test_an_adapter_of_another_base_is_refused(tiny_model_dir, adapters, tmp_path):
    import json
    import shutil

    shutil.copytree(adapters / "one", tmp_path / "other")
    config = json.loads((tmp_path / "other" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "default"  # the embedded whisper-base, not this tiny model
    (tmp_path / "other" / "adapter_config.json").write_text(json.dumps(config))
    shutil.copytree(adapters / "one", tmp_path / "adaptive")
    config["base_model_name_or_path"], config["peft_type"] = str(tiny_model_dir), "ADALORA"
    (tmp_path / "adaptive" / "adapter_config.json").write_text(json.dumps(config))
    shutil.copytree(adapters / "two", tmp_path / "fine")
    pool = ModelPool(str(tiny_model_dir), str(tmp_path))
    # neither is listed: a client never sees a model that fails only when used
    assert [m.id for m in pool.models()][2:] == ["fine"]
    with pytest.raises(UnknownModel, match="'other' is not served: adapter 'other' was trained on default, this "
                                           "server's base model is .*; this server has: whisper-1, .*fine"):
        pool.resolve("other")
    with pytest.raises(UnknownModel, match="'adaptive' is not served: adapter 'adaptive' is ADALORA, not LoRA"):
        pool.resolve("adaptive")
    with pytest.raises(UserError, match="was trained on default, this server's base model is"):
        with pool.using("other"):
            pass
    assert set(pool.refused) == {"other", "adaptive"}


def test_a_full_house_refuses_with_busy_and_a_failed_batch_fails_only_its_calls(tiny_model_dir, clips):
    from whisper_lora.serve.service import Busy

    pool = ModelPool(str(tiny_model_dir), device="cpu")
    service = TranscriptionService(pool, max_wait=0.05, max_queue=1)
    try:
        segments, info = service.transcribe(clips[0], None, "en", OPTIONS)
        before = join_text(list(segments), info.language)
        segments, _ = service.transcribe(clips[0], None, "en", OPTIONS)  # admitted until consumed
        with pytest.raises(Busy):
            service.transcribe(clips[1], None, "en", OPTIONS)
        list(segments)
        assert service.in_flight == 0
        real = pool.backend.decode_rows
        failures = threading.Event()

        def broken(*args, **kwargs):
            if not failures.is_set():
                failures.set()
                raise RuntimeError("boom")
            return real(*args, **kwargs)

        pool.backend.decode_rows = broken
        with pytest.raises(RuntimeError, match="boom"):
            list(service.transcribe(clips[0], None, "en", OPTIONS)[0])
        assert service.in_flight == 0  # the slot came back
        segments, info = service.transcribe(clips[0], None, "en", OPTIONS)  # the worker lives on
        assert join_text(list(segments), info.language) == before and before
    finally:
        service.close()


def test_the_serve_options_reach_the_batcher(tiny_model_dir, adapters):
    from whisper_lora.config import ServeConfig, build_config
    from whisper_lora.stages.serve import build_service

    service = build_service(build_config(ServeConfig, overrides={
        "model": str(tiny_model_dir), "adapters": str(adapters), "max_batch": 3, "batch_wait_ms": 250,
        "max_queue": 5, "mixed_adapters": True, "device": "cpu", "dtype": "bfloat16"}))
    try:
        batcher = service.batcher
        assert (batcher.max_batch, batcher.max_wait, batcher.mixed_adapters, service.max_queue) == (3, 0.25, True, 5)
        assert service.backend.dtype == torch.bfloat16 and service.backend.device == "cpu"
        with service.pool.using("one"):  # an adapter loads beside a bfloat16 base and decodes with it
            segments, info = service.transcribe(np.zeros(16000, np.float32) + 0.01, "one", "en", OPTIONS)
            list(segments)
    finally:
        service.close()
