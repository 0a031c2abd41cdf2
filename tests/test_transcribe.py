import json

import pytest

from conftest import SPEECH_EN, cli_here, run_cli, write_tone
from whisper_lora.stages.transcribe import expand_inputs


def test_inputs_from_files_folders_and_list_files(tmp_path):
    a = write_tone(tmp_path / "one" / "a.wav")
    b = write_tone(tmp_path / "dir" / "sub" / "b.flac")
    (tmp_path / "dir" / "notes.md").write_text("not audio")
    (tmp_path / "list.txt").write_text("# my clips\none/a.wav\n\n")
    # the list file names a.wav again: each file is transcribed once
    assert expand_inputs([str(a), str(tmp_path / "dir"), str(tmp_path / "list.txt")]) == [a, b]


def test_real_model_transcribes_files_and_folders(base_model_dir, capsys):
    """The embedded whisper-base through the CLI, batching several clips, default model."""
    result = cli_here(capsys, "transcribe", str(SPEECH_EN / "cards"), "--batch-size", "3", "--language", "en")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 5
    assert all("\t" in line for line in lines)
    assert "clubs" in lines[0].lower()


def test_jsonl_output_has_segments_language_detection_and_sentiment(base_model_dir, tmp_path, capsys):
    out = tmp_path / "o.jsonl"
    result = cli_here(capsys, "transcribe", str(SPEECH_EN / "arctic_a0009.wav"), "--output-format", "jsonl", "--output", str(out),
                     "--sentiment")
    assert result.returncode == 0, result.stderr[-2000:]
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert "sentiment: true" in (tmp_path / "o.jsonl.config.yaml").read_text()  # the resolved config beside it
    assert row["language"] == "en" and row["language_probability"] > 0.5
    assert "gregson" in row["text"].lower()
    assert row["sentiment"]["label"] == "neutral" and row["segments"][0]["sentiment"]["label"] == "neutral"
    (segment,) = row["segments"]
    assert 0 <= segment["start"] < segment["end"] <= row["duration"]
    assert segment["temperature"] == 0.0 and segment["compression_ratio"] > 0


@pytest.mark.parametrize("backend", ["transformers", "ct2"])
def test_a_clip_under_30_s_gets_one_cue_per_utterance_and_words(base_model_dir, tmp_path, backend, capsys):
    """Subtitles of a short recording come from Whisper's timestamp tokens, not one cue over the clip;
    word timestamps come inside their segments, on both backends."""
    import srt

    from conftest import conversation_clip

    clip, onsets = conversation_clip(tmp_path)
    result = cli_here(capsys, "transcribe", str(clip), "--language", "en", "--backend", backend, "--word-timestamps",
                     "--output-format", "all", "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-2000:]
    cues = list(srt.parse((tmp_path / "out" / "conversation.srt").read_text()))
    assert len(cues) == len(onsets), cues
    import yaml

    resolved = yaml.safe_load((tmp_path / "out" / "transcribe_config.yaml").read_text())
    assert resolved["backend"] == backend and resolved["word_timestamps"] is True and resolved["inputs"] == [str(clip)]
    assert "gregson" in cues[0].content.lower()
    for cue, onset in zip(cues, onsets):
        assert abs(cue.start.total_seconds() - onset) < 0.5, (cue, onset)
        assert cue.end.total_seconds() - cue.start.total_seconds() < 5  # an utterance, not the whole clip
    for segment in json.loads((tmp_path / "out" / "conversation.json").read_text())["segments"]:
        words = segment["words"]
        assert all(segment["start"] - 0.01 <= w["start"] <= w["end"] <= segment["end"] + 0.01 for w in words)
        assert [w["start"] for w in words] == sorted(w["start"] for w in words)
        assert "".join(w["word"] for w in words).strip() == segment["text"]


def test_long_audio_to_every_format_with_valid_timestamps(base_model_dir, tmp_path, capsys):
    import numpy as np
    import soundfile as sf
    import srt
    import webvtt

    from whisper_lora.audio import load_audio

    speech = load_audio(SPEECH_EN / "arctic_a0007.wav")
    audio = np.concatenate([speech, np.zeros(16000 * 8, np.float32)] * 3 + [speech])  # ~36 s
    sf.write(tmp_path / "long.flac", audio, 16000)
    duration = len(audio) / 16000
    result = cli_here(capsys, "transcribe", str(tmp_path / "long.flac"), "--language", "en", "--output-format", "all",
                     "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-2000:]
    produced = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert produced == ["long.json", "long.srt", "long.tsv", "long.txt", "long.vtt", "transcribe_config.yaml"]
    cues = list(srt.parse((tmp_path / "out" / "long.srt").read_text()))
    assert len(cues) >= 4
    starts = [c.start.total_seconds() for c in cues]
    assert starts == sorted(starts)
    assert all(0 <= c.start.total_seconds() < c.end.total_seconds() <= duration + 0.01 for c in cues)
    assert cues[-1].start.total_seconds() > 30  # the part after the first window is there
    assert len(webvtt.read(str(tmp_path / "out" / "long.vtt"))) == len(cues)


def test_output_option_conflicts(tmp_path):
    result = run_cli("transcribe", "a.wav", "--output-format", "jsonl", "--output-dir", str(tmp_path))
    assert result.returncode == 2 and "--output-format jsonl and --output-dir conflict" in result.stderr
    result = run_cli("transcribe", "a.wav", "--output-format", "all")
    assert result.returncode == 2 and "--output-format all needs --output-dir" in result.stderr
    result = run_cli("transcribe", "a.wav", "--output-format", "docx")
    assert result.returncode == 2 and "invalid choice: 'docx'" in result.stderr


def test_ct2_backend_needs_a_ct2_model(tiny_model_dir, tmp_path):
    write_tone(tmp_path / "a.wav")
    result = run_cli("transcribe", str(tmp_path / "a.wav"), "--backend", "ct2", "--model", str(tiny_model_dir))
    assert result.returncode == 2 and "is not a CTranslate2 model" in result.stderr and "whisper-lora export" in result.stderr


def test_vad_skips_silence_and_keeps_original_times(base_model_dir, tmp_path, capsys):
    import numpy as np
    import soundfile as sf

    from whisper_lora.audio import load_audio
    from whisper_lora.vad import speech_regions, speech_windows

    speech = load_audio(SPEECH_EN / "arctic_a0009.wav")
    silence = np.zeros(16000 * 30, np.float32)
    audio = np.concatenate([silence, speech, silence, speech])  # speech at ~30 s and ~63 s
    regions = speech_regions(audio)
    assert len(regions) == 2
    assert 29.5 < regions[0].start < 30.5 and 62.5 < regions[1].start < 63.7
    (window,) = speech_windows(regions, len(audio) / 16000)  # the 30 s silence between them shrinks to 2 s
    assert window.duration < 2 * len(speech) / 16000 + 4
    assert 62.5 < window.to_original(window.duration - 1) < 63.7 + len(speech) / 16000
    assert speech_regions(np.zeros(16000 * 10, np.float32)) == []

    sf.write(tmp_path / "gappy.wav", audio, 16000)
    sf.write(tmp_path / "silence.wav", silence, 16000)
    out = tmp_path / "out"
    result = cli_here(capsys, "transcribe", str(tmp_path / "gappy.wav"), str(tmp_path / "silence.wav"), "--vad",
                     "--language", "en", "--output-format", "json", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    gappy = json.loads((out / "gappy.json").read_text())
    starts = [s["start"] for s in gappy["segments"]]
    assert len(starts) == 2 and 29.5 < starts[0] < 30.5 and 62.5 < starts[1] < 63.7
    assert all("gregson" in s["text"].lower() for s in gappy["segments"])
    assert json.loads((out / "silence.json").read_text())["segments"] == []  # no invented text


def peak_rss_mb(*args: str) -> tuple[int, float]:
    """Run the CLI under GNU time and return (exit code, peak resident memory in MB)."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    result = subprocess.run(["/usr/bin/time", "-f", "PEAK_KB %M", sys.executable, "-m", "whisper_lora", *args],
                            capture_output=True, text=True, cwd=REPO, env=dict(os.environ), timeout=900)
    peak = [line for line in result.stderr.splitlines() if line.startswith("PEAK_KB")][-1]
    return result.returncode, int(peak.split()[1]) / 1024


def test_three_hour_file_is_transcribed_in_bounded_memory(base_model_dir, tmp_path):
    import shutil

    import numpy as np
    import soundfile as sf

    if not shutil.which("/usr/bin/time"):
        pytest.skip("GNU time is needed to measure peak memory")
    rate = 8000  # 8 kHz, 8-bit keeps the 3-hour file at 86 MB on disk
    with sf.SoundFile(tmp_path / "three_hours.wav", "w", rate, 1, subtype="PCM_U8") as f:
        block = np.zeros(rate * 600, np.float32)
        for _ in range(18):  # 18 x 10 min
            f.write(block)
    sf.write(tmp_path / "one_minute.wav", np.zeros(rate * 60, np.float32), rate, subtype="PCM_U8")
    code_short, short_mb = peak_rss_mb("transcribe", str(tmp_path / "one_minute.wav"), "--language", "en")
    code_long, long_mb = peak_rss_mb("transcribe", str(tmp_path / "three_hours.wav"), "--language", "en")
    assert code_short == 0 and code_long == 0
    # Decoding the whole file at once would hold 3 h x 16 kHz float32 = 691 MB more.
    assert long_mb < short_mb + 150, (short_mb, long_mb)


def test_language_the_model_lacks(tmp_path, capsys):
    write_tone(tmp_path / "a.wav")
    result = cli_here(capsys, "transcribe", str(tmp_path / "a.wav"), "--model", "embedded:tiny.en", "--language", "zh")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "embedded:tiny.en: the model has no language 'zh' (it is English-only)" in result.stderr


def test_compile_option_gives_the_same_text(capsys):
    clip = str(SPEECH_EN / "cards" / "001.wav")
    plain = cli_here(capsys, "transcribe", clip, "--model", "embedded:tiny.en")
    # in a process of its own: compiled graphs would stay in this one
    compiled = run_cli("transcribe", clip, "--model", "embedded:tiny.en", "--compile")
    assert plain.returncode == 0 and compiled.returncode == 0, compiled.stderr[-2000:]
    assert compiled.stdout == plain.stdout and "clubs" in plain.stdout.lower()


def test_dtype_bfloat16_runs_the_real_model_in_bfloat16_on_the_cpu(capsys, monkeypatch):
    """`--dtype bfloat16` reaches the weights (checked on the model the stage loads) and reads the clip as
    float32 does; a GPU that is not there is refused in one line."""
    import torch

    from whisper_lora import decode

    loaded = []
    real = decode.load_backend
    monkeypatch.setattr("whisper_lora.stages.transcribe.load_backend",
                        lambda *a, **k: loaded.append(real(*a, **k)) or loaded[-1])
    clip = str(SPEECH_EN / "arctic_a0009.wav")
    plain = cli_here(capsys, "transcribe", clip, "--model", "embedded:tiny.en", "--device", "cpu")
    half = cli_here(capsys, "transcribe", clip, "--model", "embedded:tiny.en", "--dtype", "bfloat16", "--device", "cpu")
    assert half.returncode == 0, half.stderr[-2000:]
    assert [b.dtype for b in loaded] == [torch.float32, torch.bfloat16]
    assert {p.dtype for p in loaded[1].model.parameters()} == {torch.bfloat16}
    assert "gregson" in half.stdout.lower() and half.stdout == plain.stdout
    if not torch.cuda.is_available():
        refused = cli_here(capsys, "transcribe", clip, "--model", "embedded:tiny.en", "--device", "cuda:0")
        assert refused.returncode == 2 and "--device cuda:0: no CUDA GPU is visible" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
