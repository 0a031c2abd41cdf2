"""`transcribe --ray`: inputs to rows, shards that resume, the actor, and a job on a real two-node Ray."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import REPO, SPEECH_EN, assert_one_line_error, cli_here

from whisper_lora.batch import (BASE, INCOMPLETE_SUFFIX, TranscriberSpec, glob_regex, list_rows, pending_rows,
                                read_shards, shard_schema)
from whisper_lora.decode import GREEDY

CLIPS = ["cards/001.wav", "cards/002.wav", "cards/003.wav", "arctic_a0007.wav", "arctic_a0009.wav"]


def references() -> dict[str, str]:
    texts = {}
    for manifest in SPEECH_EN.rglob("transcripts.json"):
        for name, text in json.loads(manifest.read_text()).items():
            texts[str((manifest.parent / name).relative_to(SPEECH_EN))] = text
    return texts


def test_rows_from_folders_globs_lists_and_manifests(tmp_path):
    audio = tmp_path / "audio"
    (audio / "sub").mkdir(parents=True)
    for name in ("a.wav", "b.flac", "sub/c.mp3"):
        (audio / name).write_bytes(b"x")
    (audio / "notes.txt.bak").write_text("not audio")
    (tmp_path / "list.txt").write_text("# comment\naudio/a.wav\n\naudio/sub/c.mp3\n")
    (tmp_path / "m.jsonl").write_text(json.dumps({"audio": "audio/a.wav", "model": "mandarin", "language": "Chinese"})
                                      + "\n" + json.dumps({"path": str(audio / "b.flac")}) + "\n")
    (tmp_path / "m.csv").write_text("audio_path,model\naudio/sub/c.mp3,other\n")

    folder = list_rows([str(audio)])
    assert [Path(r["path"]).name for r in folder] == ["a.wav", "b.flac", "c.mp3"]  # recursive, audio only
    assert {r["model"] for r in folder} == {BASE}
    assert [Path(r["path"]).name for r in list_rows([str(audio / "*.wav")])] == ["a.wav"]
    assert [Path(r["path"]).name for r in list_rows([f"file://{audio}/**/*.mp3"])] == ["c.mp3"]
    assert [Path(r["path"]).name for r in list_rows([f"file://{audio}/*.*"])] == ["a.wav", "b.flac"]  # not sub/
    assert glob_regex("b/2025/**/*.flac").match("b/2025/x.flac") and glob_regex("b/**/*.flac").match("b/1/2/x.flac")
    assert not glob_regex("b/*.wav").match("b/sub/x.wav")
    assert [Path(r["path"]).name for r in list_rows([str(tmp_path / "list.txt")], language="en")] == ["a.wav", "c.mp3"]
    manifest = list_rows([str(tmp_path / "m.jsonl"), str(tmp_path / "m.csv")], model="default-adapter")
    assert [(Path(r["path"]).name, r["model"], r["language"]) for r in manifest] == [
        ("a.wav", "mandarin", "zh"), ("b.flac", "default-adapter", None), ("c.mp3", "other", None)]
    assert manifest[0]["path"] == str(audio / "a.wav")  # relative to the manifest's folder
    # the same file for two models is two rows; named twice for one model, one row
    assert len(list_rows([str(audio / "a.wav"), str(tmp_path / "m.jsonl"), str(audio / "a.wav")])) == 3


def test_rows_name_what_is_wrong(tmp_path, capsys):
    (tmp_path / "m.jsonl").write_text('{"text": "no audio"}\n')
    with pytest.raises(Exception, match="row 1 has no audio path"):
        list_rows([str(tmp_path / "m.jsonl")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match="no audio files found"):
        list_rows([str(tmp_path / "empty")])
    result = cli_here(capsys, "transcribe", str(tmp_path), "--ray", "--output-dir", str(tmp_path / "o"),
                      "--output-format", "srt")
    assert_one_line_error(result, "--ray writes jsonl or parquet shards, not srt")
    result = cli_here(capsys, "transcribe", str(tmp_path), "--output-format", "parquet")
    assert_one_line_error(result, "--output-format parquet needs --ray")


def test_shards_resume_and_a_cut_shard_is_set_aside(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = shard_schema(words=True)
    failed = {"path": "/x/bad.wav", "model": BASE, "error": "/x/bad.wav: cannot decode audio", "segments": []}
    done = {"path": "/x/a.wav", "model": BASE, "text": "hi", "duration": 1.0, "error": None,
            "segments": [{"id": 0, "start": 0.0, "end": 1.0, "text": "hi", "words": [
                {"start": 0.0, "end": 0.5, "word": " hi", "probability": 0.9}]}]}
    # a block of failures only keeps the schema of a block of transcripts (pyarrow alone infers list<null>)
    assert pa.Table.from_pylist([failed], schema=schema).schema == pa.Table.from_pylist([done], schema=schema).schema
    pq.write_table(pa.Table.from_pylist([failed, done], schema=schema), tmp_path / "part-1-000000.parquet")
    (tmp_path / "part-2-000000.parquet").write_bytes((tmp_path / "part-1-000000.parquet").read_bytes()[:300])
    (tmp_path / "part-3-000000.jsonl").write_text(json.dumps({"path": "/x/c.wav", "model": "m"}) + "\n")

    rows, notes = read_shards(str(tmp_path))
    assert len(notes) == 1 and "part-2-000000.parquet: unreadable" in notes[0]
    assert (tmp_path / f"part-2-000000.parquet{INCOMPLETE_SUFFIX}").exists()
    assert rows[1]["segments"][0]["words"][0]["word"] == " hi"
    asked = [{"path": p, "model": m} for p, m in [("/x/a.wav", BASE), ("/x/bad.wav", BASE), ("/x/c.wav", BASE),
                                                  ("/x/c.wav", "m"), ("/x/d.wav", BASE)]]
    assert pending_rows(asked, rows) == [{"path": "/x/c.wav", "model": BASE}, {"path": "/x/d.wav", "model": BASE}]


def test_the_actor_transcribes_rows_per_model_and_reports_bad_files(adapters_dir, mandarin_adapter, tmp_path):
    """The class Ray Data runs, called as Ray calls it: a batch of rows, each naming its model."""
    import pyarrow as pa

    from whisper_lora.batch import Transcriber
    from whisper_lora.scoring import score_rows

    _, rows = mandarin_adapter
    (tmp_path / "bad.wav").write_bytes(b"RIFF not really")
    batch = [{"path": rows[0]["audio"]["path"], "model": "mandarin", "language": "zh"},
             {"path": rows[1]["audio"]["path"], "model": "mandarin", "language": "zh"},
             {"path": str(SPEECH_EN / CLIPS[3]), "model": BASE, "language": "en"},
             {"path": str(tmp_path / "bad.wav"), "model": BASE, "language": None},
             {"path": str(SPEECH_EN / CLIPS[0]), "model": "nonesuch", "language": None}]
    actor = Transcriber(TranscriberSpec(None, str(adapters_dir), "transformers", "default", "cpu", "auto",
                                        GREEDY, vad=False))
    out = actor(pa.Table.from_pylist(batch)).to_pylist()
    assert [r["path"] for r in out] == [r["path"] for r in batch]
    mandarin = score_rows("m", [{"reference": row["sentence"], "hypothesis": r["text"], "language": "zh"}
                                for row, r in zip(rows, out[:2])])
    assert mandarin.cer < 0.2, [r["text"] for r in out[:2]]  # the adapter read them (the base: CER > 100%)
    assert out[2]["error"] is None and out[2]["language"] == "en" and out[2]["segments"]
    assert out[2]["duration"] == pytest.approx(out[2]["segments"][-1]["end"], abs=1.0)
    assert out[3]["error"].startswith(str(tmp_path / "bad.wav")) and out[3]["text"] is None
    assert "nonesuch" in out[4]["error"]


# ---- a real Ray: two nodes on this machine, a job through the CLI ------------------------------------------

@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """A head and a second node, one CPU each, as separate raylets (Ray's own multi-node test harness)."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    from whisper_lora.models import resolve_model

    resolve_model("embedded:tiny.en")  # converted once here, not by both actors at once
    small = {"object_store_memory": 150 * 2**20, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"head": 1}, **small})
    cluster.add_node(num_cpus=1, resources={"second": 1}, **small)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def holders_of(path: Path) -> list[int]:
    """Processes that have `path` open (Linux /proc): the actor blocked reading the pipe."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if any(os.readlink(fd) == str(path) for fd in (proc / "fd").iterdir()):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def test_a_job_on_two_nodes_survives_a_killed_worker_and_resumes(two_nodes, tmp_path):
    """Rows land on both nodes; an actor killed while it reads a row (a named pipe holds it there, so the
    kill is mid-job by construction, not by timing) is restarted and its rows written once; a corrupt file
    is an error row and exit status 1; the same command again transcribes nothing."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in CLIPS:
        shutil.copy(SPEECH_EN / name, inputs / name.replace("/", "-"))
    (inputs / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot audio at all")
    pipe = inputs / "zz-pipe.wav"
    os.mkfifo(pipe)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "whisper_lora", "transcribe", str(inputs), str(pipe), "--ray", "--ray-address",
               two_nodes.address, "--output-dir", str(out), "--output-format", "parquet", "--model",
               "embedded:tiny.en", "--language", "en", "--num-workers", "2", "--rows-per-call", "2"]
    # The test holds the pipe open read-write: an actor's open() returns at once and it blocks reading, with
    # the pipe among its open files, until the test writes.
    held = os.open(pipe, os.O_RDWR)
    job = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        def readers(*besides: int) -> list[int]:
            while not (found := [p for p in holders_of(pipe) if p not in (os.getpid(), *besides)]):
                assert job.poll() is None, job.communicate()[1][-3000:]
                threading.Event().wait(0.2)
            return found

        killed = readers()[0]
        os.kill(killed, signal.SIGKILL)  # mid-job: the row is half read
        readers(killed)  # the row again, in the restarted actor
        data = (SPEECH_EN / CLIPS[4]).read_bytes()
        while data:
            data = data[os.write(held, data):]
        os.close(held)
        held = None
        stdout, stderr = job.communicate(timeout=400)
    finally:
        if held is not None:
            os.close(held)
        if job.poll() is None:
            job.kill()
    assert job.returncode == 1, stderr[-3000:]  # the corrupt file
    assert "corrupt.wav" in stderr and "rows of the job have errors" in stderr

    rows, notes = read_shards(str(out))
    assert not notes
    by_name = {Path(r["path"]).name: r for r in rows}
    assert len(rows) == len(by_name) == len(CLIPS) + 2  # every row exactly once, the killed one included
    assert by_name["corrupt.wav"]["error"].startswith(str(inputs / "corrupt.wav"))
    texts = references()
    from whisper_lora.scoring import score_rows

    score = score_rows("tiny.en", [{"reference": texts[CLIPS[4]], "hypothesis": by_name["zz-pipe.wav"]["text"],
                                    "language": "en"}])
    assert score.wer < 0.3, by_name["zz-pipe.wav"]["text"]  # the pipe's audio, read by the restarted actor
    nodes = {r["worker"].split(":")[0] for r in rows}
    assert len(nodes) == 2, nodes  # both nodes transcribed rows
    shards = sorted(p.name for p in out.glob("part-*"))

    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and f"{len(CLIPS) + 2} already in" in again.stderr, again.stderr[-2000:]
    assert sorted(p.name for p in out.glob("part-*")) == shards  # nothing transcribed twice
