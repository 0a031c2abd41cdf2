"""Shared fixtures: a tiny random Whisper (fast unit tests), the real embedded models, audio files.

The tiny model keeps the real multilingual tokenizer and generation config, so prompts, language
tokens and decoding behave exactly as with real weights; only the network is small and random.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

# `make test` runs the suite on one pytest-xdist worker per core. Each worker computes on one thread: two
# workers of two threads each on two cores ran slower than one process (21 min, most tests 2x slower),
# one thread each took 14 min — a worker waiting on imports, a subprocess or a socket leaves its core
# to the other. Subprocesses (CLI runs, the server, torchrun ranks) inherit the setting. Set before
# torch is imported; an explicit OMP_NUM_THREADS wins.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
SPEECH_EN = REPO / "demo" / "data" / "speech-en"  # CMU ARCTIC and CMU Sphinx clips, licences beside them
DEMO = REPO / "demo" / "data"
SR = 16000


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Model conversions go to a cache of this `pytest` run, so tests never depend on a user's cache. Its xdist
    workers share it (conversions take a file lock each): each embedded model is converted once per run."""
    cache = session_root(tmp_path_factory) / "model-cache"
    cache.mkdir(exist_ok=True)
    os.environ["WHISPER_LORA_CACHE"] = str(cache)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    yield


@pytest.fixture(scope="session")
def base_model_dir(isolated_cache) -> Path:
    """The real embedded whisper-base, converted once per session (~7 s)."""
    from whisper_lora.models import resolve_model

    return Path(resolve_model(None).location)


@pytest.fixture(scope="session")
def tiny_model_dir(base_model_dir, tmp_path_factory) -> Path:
    """A randomly initialised 2-layer Whisper with the real tokenizer and generation config."""
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration, WhisperProcessor

    real = WhisperConfig.from_pretrained(base_model_dir)
    config = WhisperConfig(vocab_size=real.vocab_size, num_mel_bins=80, d_model=64, encoder_layers=2,
                           decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                           encoder_ffn_dim=128, decoder_ffn_dim=128, max_source_positions=1500,
                           max_target_positions=448, pad_token_id=real.pad_token_id, bos_token_id=real.bos_token_id,
                           eos_token_id=real.eos_token_id, decoder_start_token_id=real.decoder_start_token_id)
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config)
    from transformers import GenerationConfig

    generation = GenerationConfig.from_pretrained(base_model_dir)
    generation.alignment_heads = [[1, 0], [1, 1]]
    model.generation_config = generation
    out = tmp_path_factory.mktemp("tiny-whisper")
    model.save_pretrained(out)
    WhisperProcessor.from_pretrained(base_model_dir).save_pretrained(out)
    return out


def write_tone(path: Path, seconds: float = 1.0, rate: int = SR, channels: int = 1, freq: float = 440.0, **kw) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    wave = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    data = np.stack([wave] * channels, axis=1) if channels > 1 else wave
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, data, rate, **kw)
    return path


@pytest.fixture
def tiny_corpus(tmp_path) -> Path:
    """Eight short real Mandarin clips from the demo corpus, as a JSON-lines train and dev manifest."""
    rows = [json.loads(line) for line in (DEMO / "train.jsonl").read_text(encoding="utf-8").splitlines()[:8]]
    folder = tmp_path / "corpus"
    (folder / "audio").mkdir(parents=True)
    for row in rows:
        shutil.copy(DEMO / row["audio"]["path"], folder / row["audio"]["path"])
    (folder / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[:6]), encoding="utf-8")
    (folder / "dev.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[6:]), encoding="utf-8")
    return folder


CONVERSATION = ("arctic_a0009.wav", "cards/001.wav", "arctic_a0007.wav", "cards/005.wav")


def conversation_clip(folder: Path) -> tuple[Path, list[float]]:
    """~22 s of real speech: four utterances 2.5 s apart. Returns the file and when each utterance starts."""
    from whisper_lora.audio import load_audio

    pieces, onsets, position = [], [], 0.0
    for name in CONVERSATION:
        speech = load_audio(SPEECH_EN / name)
        onsets.append(position)
        pieces += [speech, np.zeros(int(SR * 2.5), np.float32)]
        position += len(speech) / SR + 2.5
    sf.write(folder / "conversation.wav", np.concatenate(pieces), SR)
    return folder / "conversation.wav", onsets


def conversation_references() -> list[str]:
    """What the four utterances of `conversation_clip` say (their transcripts.json)."""
    texts = {}
    for manifest in SPEECH_EN.rglob("transcripts.json"):
        for name, text in json.loads(manifest.read_text()).items():
            texts[str((manifest.parent / name).relative_to(SPEECH_EN))] = text
    return [texts[name] for name in CONVERSATION]


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real console entry point in a subprocess, as a user would."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "whisper_lora", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, env=env, timeout=timeout)


def cli_here(capsys, *args: str) -> subprocess.CompletedProcess:
    """The CLI's entry point in this process, its output captured: for tests about what a command
    produces rather than how the process behaves, ~10 s of imports cheaper than `run_cli`."""
    from whisper_lora.cli import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["whisper-lora", *args], code, out, err)


def assert_one_line_error(result, *fragments):
    """Exit code 2, no traceback, and exactly one `whisper-lora: error:` line holding every fragment."""
    assert result.returncode == 2, (result.returncode, result.stderr[-1500:])
    assert "Traceback" not in result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("whisper-lora: error:")]
    assert len(lines) == 1, result.stderr[-1500:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def free_port() -> int:
    """A port nobody listens on now: a fixed port reused by the next test can still be in TIME_WAIT, or
    held by a rank a previous run left behind."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAUNCH_TIMEOUT = 420  # seconds; a two-process test run takes 1-2 minutes on two busy cores


def run_launcher(command: list[str], env: dict | None = None, timeout: int = LAUNCH_TIMEOUT) -> subprocess.CompletedProcess:
    """Run a multi-process launcher (torchrun, accelerate launch) in a session of its own.

    On a timeout every process it started is killed, ranks included (a stuck rank would otherwise
    outlive the test and hold its memory), and the test fails with the launcher's own output.
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        import pytest

        pytest.fail(f"{command[2:4]} did not finish in {timeout} s; its output:\n{stdout[-2000:]}\n{stderr[-4000:]}",
                    pytrace=False)
    result = subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)
    assert result.returncode == 0, stderr[-3000:]
    return result


@pytest.fixture(scope="session")
def mandarin_adapter(base_model_dir, tmp_path_factory) -> tuple[Path, list[dict]]:
    """A real LoRA adapter on the embedded whisper-base, trained here (decoder only, ~35 s) on 8
    robotic-Mandarin demo clips that the base model reads badly (CER on them: >100% base, ~3% after).
    Returns its folder and those rows."""
    from filelock import FileLock

    from whisper_lora.config import TrainConfig, build_config
    from whisper_lora.stages import train

    # Trained once per `pytest` run: xdist workers share their run's temporary root and take turns at a lock;
    # the first trains, the others read its folder.
    root = session_root(tmp_path_factory)
    corpus, out = root / "mandarin", root / "mandarin-run"
    with FileLock(str(root / "mandarin.lock")):
        if not (out / "run" / "adapter" / "adapter_model.safetensors").is_file():
            rows = [json.loads(line) for line in (DEMO / "train.jsonl").read_text(encoding="utf-8").splitlines()[:8]]
            (corpus / "audio").mkdir(parents=True, exist_ok=True)
            for row in rows:
                shutil.copy(DEMO / row["audio"]["path"], corpus / row["audio"]["path"])
                row["audio"]["path"] = str(corpus / row["audio"]["path"])
            (corpus / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                                encoding="utf-8")
            shutil.rmtree(out, ignore_errors=True)  # a worker that died mid-run
            train.run(build_config(TrainConfig, overrides=dict(
                train_manifest=str(corpus / "train.jsonl"), output_dir=str(out / "run"), freeze_encoder=True,
                lora_r=16, lora_alpha=32, lora_dropout=0.0, batch_size=4, max_steps=10, learning_rate=3e-3,
                warmup_steps=2, timestamp_fraction=0.0, tensorboard=False, logging_steps=4)))
    rows = [json.loads(line) for line in (corpus / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    return out / "run" / "adapter", rows


def session_root(tmp_path_factory) -> Path:
    """A temporary folder of this `pytest` run that all its xdist workers share (each worker's own
    basetemp lies in it); without xdist, the run's basetemp."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


# ---- the server, as users run it -----------------------------------------------------------------------

KEY = "test-key"


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def metric(self, name: str) -> float:
        lines = [ln for ln in self.get("/metrics")[1].splitlines() if ln.startswith(name + " ")]
        return float(lines[0].split()[-1]) if lines else 0.0

    def client(self, key: str = KEY, **kwargs):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kwargs)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()


def start_server(tmp: Path, *args: str, timeout: float = 180) -> Server:
    port = free_port()
    log = tmp / f"serve-{port}.log"
    process = subprocess.Popen([sys.executable, "-m", "whisper_lora", "serve", "--port", str(port), *args],
                               cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                               env=dict(os.environ, PYTHONUNBUFFERED="1"))
    server = Server(f"http://127.0.0.1:{port}", process, log)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if server.get("/health")[0] == 200:
                return server
        except OSError:
            pass
        time.sleep(0.5)
    server.stop()
    pytest.fail(f"the server was not healthy within {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def adapters_dir(mandarin_adapter, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("adapters")
    shutil.copytree(mandarin_adapter[0], folder / "mandarin")
    return folder


@pytest.fixture(scope="session")
def server(adapters_dir, tmp_path_factory):
    """`whisper-lora serve` in its own process: the embedded whisper-base with the trained Mandarin adapter,
    an API key, and a 1 MB upload limit. Shared by the API, realtime and web UI tests."""
    server = start_server(tmp_path_factory.mktemp("logs"), "--adapters", str(adapters_dir), "--api-key", KEY,
                          "--max-upload-mb", "1")
    yield server
    server.stop()
    assert "Traceback" not in server.log.read_text()  # no request made the server print one


