import json

from conftest import SHARED_EN, run_cli, write_tone
from whisper_lora.stages.transcribe import expand_inputs


def test_inputs_from_files_folders_and_list_files(tmp_path):
    a = write_tone(tmp_path / "one" / "a.wav")
    b = write_tone(tmp_path / "dir" / "sub" / "b.flac")
    (tmp_path / "dir" / "notes.md").write_text("not audio")
    (tmp_path / "list.txt").write_text("# my clips\none/a.wav\n\n")
    assert expand_inputs([str(a), str(tmp_path / "dir"), str(tmp_path / "list.txt")]) == [a, b, tmp_path / "one" / "a.wav"]


def test_real_model_transcribes_files_and_folders(base_model_dir):
    """The embedded whisper-base through the CLI, batching several clips, default model."""
    result = run_cli("transcribe", str(SHARED_EN / "cards"), "--batch-size", "3", "--language", "en")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 5
    assert all("\t" in line for line in lines)
    assert "clubs" in lines[0].lower()


def test_jsonl_output_has_segments_and_language_detection(base_model_dir, tmp_path):
    out = tmp_path / "o.jsonl"
    result = run_cli("transcribe", str(SHARED_EN / "arctic_a0009.wav"), "--output-format", "jsonl", "--output", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["language"] == "en" and row["language_probability"] > 0.5
    assert "gregson" in row["text"].lower()
    assert row["segments"][0]["end"] == row["duration"]
