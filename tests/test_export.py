import json
from pathlib import Path

import pytest

from conftest import SPEECH_EN, cli_here, run_cli
from whisper_lora.scoring import score_rows
from whisper_lora.stages.export import parity_verdict

pytest.importorskip("faster_whisper")


def rows(hypotheses):
    refs = ["ten of clubs", "five five"]
    return [{"audio": f"{i}.wav", "reference": r, "hypothesis": h, "language": "fr"}
            for i, (r, h) in enumerate(zip(refs, hypotheses))]


def test_parity_verdict_fails_when_the_export_is_worse():
    reference = score_rows("hf", rows(["ten of clubs", "five five"]))
    worse = score_rows("ct2", rows(["ten of clubs", "five"]))  # one deletion in five words = 20 points
    verdict = parity_verdict(reference, worse, "wer", 0.5)
    assert verdict["gap_points"] == pytest.approx(20.0) and not verdict["passed"]
    assert parity_verdict(worse, reference, "wer", 0.5)["passed"]  # being better is never a failure


def test_export_real_model_to_faster_whisper_with_parity_gate(base_model_dir, tmp_path, capsys):
    from faster_whisper import WhisperModel

    out = tmp_path / "ct2"
    result = cli_here(capsys, "export", "default", "--output-dir", str(out), "--quantization", "float32",
                      "--dev-manifest", str(SPEECH_EN / "cards" / "transcripts.json"), "--language", "en", "--max-gap", "10",
                      "--min-identical", "0")  # faster-whisper pads the spectrogram: 2 of these 5 hard clips read otherwise
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "export_report.json").read_text())
    assert report["passed"] and report["clips"] == 5 and "transformers_wer" in report and "ct2_wer" in report
    assert "gap:" in result.stdout
    segments, info = WhisperModel(str(out), device="cpu").transcribe(str(SPEECH_EN / "arctic_a0009.wav"), language="en")
    assert "gregson" in " ".join(s.text for s in segments).lower()


def test_export_refuses_existing_target_and_missing_dev_manifest(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "model.bin").write_text("x")
    result = run_cli("export", "default", "--output-dir", str(tmp_path / "taken"), "--no-parity-check")
    assert result.returncode == 2 and "taken: export target exists" in result.stderr
    result = run_cli("export", "default", "--output-dir", str(tmp_path / "new"))
    assert result.returncode == 2 and "parity gate needs --dev-manifest" in result.stderr


def test_a_verdict_counts_the_clips_that_read_differently():
    reference = score_rows("hf", rows(["ten of clubs", "five five"]))
    other = score_rows("ggml", rows(["ten of clubs", "Five, five."]))  # the same words to WER, another text
    verdict = parity_verdict(reference, other, "wer", 0.5, min_identical=0.9, runtime="ggml")
    assert verdict["gap_points"] == 0 and verdict["identical_texts"] == 1 and not verdict["passed"]
    assert verdict["differing"] == [{"audio": "1.wav", "transformers": "five five", "ggml": "Five, five."}]
    assert parity_verdict(reference, other, "wer", 0.5, min_identical=0.5)["passed"]


@pytest.fixture(scope="module")
def ten_clips(tmp_path_factory):
    """Ten held-out English clips of the demo (its espeak-ng voices), as a dev manifest."""
    from conftest import DEMO

    manifest = tmp_path_factory.mktemp("dev") / "ten.jsonl"
    lines = (DEMO / "test_en.jsonl").read_text().splitlines()[:10]
    manifest.write_text("".join(line.replace('"audio/', f'"{DEMO}/audio/') + "\n" for line in lines))
    return manifest


@pytest.mark.parametrize("fmt", ["ggml", "openai"])
def test_export_to_whisper_cpp_and_openai_whisper_passes_its_gate_in_that_runtime(fmt, ten_clips, tmp_path, capsys):
    """The embedded tiny.en, exported and read back by whisper.cpp (pywhispercpp) or openai-whisper: 9 of 10
    texts at least identical to ours (the default gate), and the file is what each runtime loads."""
    out = tmp_path / fmt
    result = cli_here(capsys, "export", "embedded:tiny.en", "--format", fmt, "--output-dir", str(out),
                      "--dev-manifest", str(ten_clips), "--language", "en")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((out / "export_report.json").read_text())
    assert report["passed"] and report["clips"] == 10 and report["identical_texts"] >= 9
    assert report["gap_points"] <= 0.5 and report["runtime"] in result.stdout
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")  # the Hub's parser: this runtime's score in the model-index
    assert card.data.base_model == "openai/whisper-tiny.en" and card.data.library_name == report["runtime"]
    (score,) = card.data.eval_results
    assert score.metric_type == "wer" and score.metric_value == round(100 * report[f"{fmt}_wer"], 2)
    arctic = str(SPEECH_EN / "arctic_a0009.wav")
    if fmt == "ggml":
        import struct

        from pywhispercpp.model import Model

        header = struct.unpack("<12i", (out / "ggml-model.bin").read_bytes()[:48])
        # magic, vocabulary, audio ctx/state/heads/layers, text ctx/state/heads/layers, mels, f16
        assert header == (0x67676D6C, 51864, 1500, 384, 6, 4, 448, 384, 6, 4, 80, 1)
        model = Model(str(out / "ggml-model.bin"), print_progress=False, redirect_whispercpp_logs_to=None)
        text = " ".join(s.text for s in model.transcribe(arctic, language="en"))
        del model
    else:
        import torch
        import whisper

        from whisper_lora.openai_checkpoint import load_openai

        assert whisper.load_model(str(out / "model.pt"), device="cpu").dims.n_text_layer == 4  # plain openai-whisper
        from whisper_lora.models import resolve_model

        pairs = json.loads((Path(resolve_model("embedded:tiny.en").location) / "generation_config.json").read_text()
                           )["alignment_heads"]
        model = load_openai(out / "model.pt")  # + the alignment heads the checkpoint carries
        assert sorted(map(list, model.alignment_heads.to_dense().nonzero().tolist())) == sorted(pairs)
        assert "alignment_heads" in torch.load(out / "model.pt", weights_only=True)
        from whisper_lora.audio import load_audio

        result = whisper.transcribe(model, load_audio(arctic), language="en", fp16=False, word_timestamps=True)
        text = result["text"]
        assert [w["word"].strip() for w in result["segments"][0]["words"]][:2] == ["He", "turned"]
    assert "gregson" in text.lower()
