"""End-to-end CLI runs in real subprocesses: every command, and every bad input as a one-line error. Bad audio
is found only after the model has loaded, so those runs call the entry point in this process (the message and
exit code are main()'s own; a subprocess would add ~10 s of imports to each)."""
import dataclasses
import json

import pytest

from conftest import REPO, assert_one_line_error, cli_here, run_cli, write_tone
from whisper_lora.cli import STAGES


def test_help_describes_every_option():
    top = run_cli("--help")
    assert top.returncode == 0
    for name, (cls, _) in STAGES.items():
        assert name in top.stdout
        sub = run_cli(name, "--help")
        assert sub.returncode == 0
        for f in dataclasses.fields(cls):
            flag = f.name.upper() if f.metadata["positional"] else "--" + f.name.replace("_", "-")
            assert flag in sub.stdout, (name, flag)
            assert f.metadata["help"], (name, f.name)


@pytest.mark.timeout(1200)  # four CLI processes, each importing torch: ~100 s alone, 600 s+ on a crowded machine
def test_end_to_end_tiny_model(tiny_model_dir, tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    from whisper_lora.cli import main

    # train and merge in this process (the CLI's own entry point; a subprocess costs ~10 s of imports),
    # evaluate and transcribe as a user runs them
    assert main(["train", "--train-manifest", str(tiny_corpus / "train.jsonl"), "--dev-manifest",
                 str(tiny_corpus / "dev.jsonl"), "--model", str(tiny_model_dir), "--output-dir", str(run_dir),
                 "--max-steps", "2", "--batch-size", "3", "--lora-r", "4", "--max-new-tokens", "6"]) == 0
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()

    merged = tmp_path / "merged"
    assert main(["merge", str(run_dir / "adapter"), "--output-dir", str(merged)]) == 0
    assert (merged / "model.safetensors").is_file()

    report = tmp_path / "eval.json"
    evaluate = run_cli("evaluate", str(tiny_corpus / "dev.jsonl"), "--models", str(tiny_model_dir),
                       str(run_dir / "adapter"), str(merged), "--output", str(report), "--max-new-tokens", "6")
    assert evaluate.returncode == 0, evaluate.stderr[-2000:]
    models = json.loads(report.read_text())["models"]
    assert len(models) == 3
    # adapter and merged model decode identically
    assert [r["hypothesis"] for r in models[1]["samples"]] == [r["hypothesis"] for r in models[2]["samples"]]

    out = tmp_path / "out.jsonl"
    # one temperature: the random model fails every fallback test, and six attempts prove nothing here
    transcribe = run_cli("transcribe", str(tiny_corpus / "audio"), "--model", str(merged), "--language", "zh",
                         "--output-format", "jsonl", "--output", str(out), "--temperature", "0")
    assert transcribe.returncode == 0, transcribe.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 8 and all(r["language"] == "zh" for r in rows)


def test_yaml_config_with_override(tiny_model_dir, tiny_corpus, tmp_path):
    (tmp_path / "train.yaml").write_text(
        f"train_manifest: {tiny_corpus / 'train.jsonl'}\nmodel: {tiny_model_dir}\nmax_steps: 1\nbatch_size: 2\n"
        f"lora_r: 2\noutput_dir: {tmp_path / 'run'}\ntensorboard: false\n")
    from whisper_lora.cli import main

    assert main(["train", "--config", str(tmp_path / "train.yaml"), "--lora-r", "3"]) == 0
    assert "lora_r: 3" in (tmp_path / "run" / "config.yaml").read_text()
    assert json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["r"] == 3


# ---- bad input: one line naming the file and the problem, exit code 2, no traceback -----------------

def test_missing_audio_file(tiny_model_dir, tmp_path):
    (tmp_path / "m.json").write_text(json.dumps({"gone.wav": "hello"}))
    result = run_cli("train", "--train-manifest", str(tmp_path / "m.json"), "--model", str(tiny_model_dir),
                     "--output-dir", str(tmp_path / "run"), "--language", "en")
    assert_one_line_error(result, "m.json", "audio file not found", "gone.wav")


@pytest.mark.parametrize("content,problem", [(b"", "audio file is empty"), (b"RIFF\x00\x00\x00\x00WAVEfmt junk", "cannot decode audio")])
def test_empty_or_corrupt_audio_in_transcribe(tiny_model_dir, tmp_path, content, problem, capsys):
    (tmp_path / "bad.wav").write_bytes(content)
    result = cli_here(capsys, "transcribe", str(tmp_path / "bad.wav"), "--model", str(tiny_model_dir))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"bad.wav: {problem}" in result.stderr


def test_zero_sample_audio_in_transcribe(tiny_model_dir, tmp_path, capsys):
    import numpy as np
    import soundfile as sf

    sf.write(tmp_path / "zero.wav", np.zeros(0, np.float32), 16000)
    result = cli_here(capsys, "transcribe", str(tmp_path / "zero.wav"), "--model", str(tiny_model_dir))
    assert result.returncode == 1 and "zero.wav: audio has zero samples" in result.stderr


def test_manifest_not_json_names_line(tiny_model_dir, tmp_path):
    (tmp_path / "m.jsonl").write_text('{"audio": {"path": "a.wav"}, "sentence": "x"}\n{"audio": \n')
    result = run_cli("train", "--train-manifest", str(tmp_path / "m.jsonl"), "--model", str(tiny_model_dir),
                     "--output-dir", str(tmp_path / "run"))
    assert_one_line_error(result, "m.jsonl", "line 2", "invalid JSON")


def test_row_without_text(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps([{"audio_path": "a.wav"}]))
    result = run_cli("evaluate", str(tmp_path / "m.json"))
    assert_one_line_error(result, "m.json", "entry 0", "no text")


def test_unknown_language_code(tiny_model_dir, tmp_path):
    write_tone(tmp_path / "a.wav")
    result = run_cli("transcribe", str(tmp_path / "a.wav"), "--language", "xx", "--model", str(tiny_model_dir))
    assert_one_line_error(result, "--language", "unknown language 'xx'")
    (tmp_path / "m.jsonl").write_text(json.dumps({"audio": {"path": "a.wav"}, "sentence": "x", "language": "zz"}) + "\n")
    result = run_cli("evaluate", str(tmp_path / "m.jsonl"))
    assert_one_line_error(result, "m.jsonl", "line 1", "unknown language 'zz'")


def test_model_that_does_not_exist(tmp_path):
    write_tone(tmp_path / "a.wav")
    result = run_cli("transcribe", str(tmp_path / "a.wav"), "--model", str(tmp_path / "nowhere"))
    assert_one_line_error(result, "nowhere", "model folder not found")


def test_model_that_is_not_whisper(tmp_path):
    write_tone(tmp_path / "a.wav")
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    result = run_cli("transcribe", str(tmp_path / "a.wav"), "--model", str(tmp_path / "gpt"))
    assert_one_line_error(result, "gpt", "'gpt2' model, not Whisper")


def test_output_folder_with_a_different_run(tiny_model_dir, tiny_corpus, tmp_path):
    common = ["train", "--train-manifest", str(tiny_corpus / "train.jsonl"), "--model", str(tiny_model_dir),
              "--output-dir", str(tmp_path / "run"), "--max-steps", "1", "--batch-size", "2", "--no-tensorboard"]
    from whisper_lora.cli import main

    assert main([*common, "--lora-r", "2"]) == 0  # in this process: the subprocess is for the error's form
    result = run_cli(*common, "--lora-r", "4")
    assert_one_line_error(result, "run", "holds a different run", "lora_r", "--overwrite")
    assert main([*common, "--lora-r", "4", "--overwrite"]) == 0
    assert json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["r"] == 4


def test_help_and_bad_inputs_answer_without_loading_torch(tmp_path):
    """`import whisper_lora`, `--help` and a missing input are answered before any heavy import."""
    import subprocess
    import sys

    probe = ("import sys, contextlib, io\n"
             "import whisper_lora\n"
             "from whisper_lora.cli import main\n"
             "with contextlib.redirect_stdout(io.StringIO()):\n"
             "    try:\n"
             "        main(['--help'])\n"
             "    except SystemExit:\n"
             "        pass\n"
             "codes = [main(['transcribe', sys.argv[1]]), main(['train', '--train-manifest', sys.argv[1]]),\n"
             "         main(['transcribe', sys.argv[2], '--model', './no/such/model'])]\n"
             "print(codes, sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))\n"
             # `transcribe --ray`'s driver hands all decoding to its actors: it must not load torch either
             "import whisper_lora.stages.transcribe_ray\n"
             "print('torch' in sys.modules)\n")
    (tmp_path / "a.wav").write_bytes(b"RIFF")
    result = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "missing.wav"), str(tmp_path / "a.wav")],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.stdout.split() == ["[2,", "2,", "2]", "[]", "False"], result.stdout + result.stderr[-2000:]
    errors = result.stderr.strip().splitlines()
    assert errors[0] == f"whisper-lora: error: {tmp_path / 'missing.wav'}: audio file not found"
    assert errors[1] == f"whisper-lora: error: {tmp_path / 'missing.wav'}: --train-manifest not found"
    assert "./no/such/model: model folder not found" in errors[2]
