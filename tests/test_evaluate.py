import json

from conftest import SPEECH_EN
from whisper_lora.config import EvaluateConfig, build_config
from whisper_lora.stages import evaluate


def test_several_models_one_table_and_every_hypothesis(base_model_dir, tiny_model_dir, tmp_path, capsys):
    config = build_config(EvaluateConfig, overrides={
        "manifest": str(SPEECH_EN / "cards" / "transcripts.json"), "models": [str(base_model_dir), str(tiny_model_dir)],
        "language": "en", "output": str(tmp_path / "eval.json"), "max_new_tokens": 24})
    scores = evaluate.run(config)
    table = capsys.readouterr().out
    assert str(base_model_dir) in table and str(tiny_model_dir) in table and "WER" in table
    real, random = scores
    assert real.wer < 0.5 < random.wer  # the real model reads card names; a random one cannot
    report = json.loads((tmp_path / "eval.json").read_text())
    assert [m["model"] for m in report["models"]] == [str(base_model_dir), str(tiny_model_dir)]
    rows = report["models"][0]["samples"]
    assert len(rows) == 5 and {"audio", "reference", "hypothesis", "language"} <= set(rows[0])
    assert report["metric"] == "wer"
    assert report["config"]["models"] == [str(base_model_dir), str(tiny_model_dir)]  # the resolved config rides along
    assert report["config"]["max_new_tokens"] == 24 and report["config"]["device"] == "auto"


def test_a_model_is_scored_at_the_encoder_context_asked_for(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """`--audio-ctx` reaches the encoder: card clips (< 2 s) at auto are encoded at its 10 s floor, at 5 s at 5 s."""
    from whisper_lora.decode import longform

    widths = []
    clip_features = longform.clip_features
    monkeypatch.setattr(longform, "clip_features",
                        lambda model, audios, ctx: widths.append(clip_features(model, audios, ctx).shape[-1]) or
                        clip_features(model, audios, ctx))
    for audio_ctx in ("auto", "5", "full"):
        evaluate.run(build_config(EvaluateConfig, overrides={
            "manifest": str(SPEECH_EN / "cards" / "transcripts.json"), "models": [str(tiny_model_dir)],
            "language": "en", "max_new_tokens": 4, "audio_ctx": audio_ctx}))
    assert widths == [1000, 500, 3000]
