import json

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
                      "--dev-manifest", str(SPEECH_EN / "cards" / "transcripts.json"), "--language", "en", "--max-gap", "10")
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
