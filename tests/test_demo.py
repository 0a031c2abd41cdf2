"""The demo stage end to end on a miniature corpus with the real embedded whisper-base."""
import json
import shutil

from conftest import DEMO, SPEECH_EN
from whisper_lora.config import DemoConfig, build_config
from whisper_lora.stages import demo

REPORT_KEYS = {"base_cer", "finetuned_cer", "base_cer_new_words", "finetuned_cer_new_words",
               "english_wer_base", "english_wer_finetuned"}


def mini_corpus(tmp_path, sizes):
    folder = tmp_path / "corpus"
    (folder / "audio").mkdir(parents=True)
    for split, n in sizes.items():
        rows = (DEMO / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()[:n]
        for row in rows:
            path = json.loads(row)["audio"]["path"]
            shutil.copy(DEMO / path, folder / path)
        (folder / f"{split}.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


def test_demo_report_on_a_mini_corpus(base_model_dir, tmp_path, capsys):
    corpus = mini_corpus(tmp_path, {"train": 8, "dev": 2, "test": 3, "test_new_words": 1})
    english = tmp_path / "english"
    english.mkdir()
    shutil.copy(SPEECH_EN / "arctic_a0009.wav", english)
    (english / "transcripts.json").write_text(json.dumps({"arctic_a0009.wav": "He turned sharply, and faced Gregson across the table."}))
    report = demo.run(build_config(DemoConfig, overrides={
        "output_dir": str(tmp_path / "demo-output"), "corpus_dir": str(corpus), "english_dir": str(english),
        "epochs": 2, "batch_size": 4, "exports": ["openai"]}))
    assert REPORT_KEYS <= set(report)
    # the report's figures are the ones its predictions give
    from whisper_lora.text import error_rate

    predictions = json.loads((tmp_path / "demo-output" / "predictions.json").read_text())
    tuned = [r for r in predictions["finetuned"] if r["language"] == "zh"]
    assert report["finetuned_cer"] == error_rate([r["reference"] for r in tuned], [r["hypothesis"] for r in tuned],
                                                 "cer", ["zh"] * len(tuned))
    assert report["base_cer"] > 0.5  # whisper-base cannot read espeak Mandarin
    assert report["finetuned_cer"] < report["base_cer"]
    assert report["english_wer_base"] < 0.2
    table = capsys.readouterr().out
    assert "Mandarin test CER" in table and "English WER (forgetting)" in table
    # the adapter in openai-whisper, read on the test set by openai-whisper, beside ours on the same clips
    (exported,) = report["exports"]
    assert exported["runtime"] == "openai-whisper" and exported["clips"] == 3 and exported["identical_texts"] <= 3
    assert exported["transformers_cer"] == error_rate(*zip(*[(r["reference"], r["hypothesis"]) for r in tuned
                                                             if "test_new" not in r["audio"]]), "cer", ["zh"] * 3)
    assert f"openai-whisper (openai, float16) | {exported['openai_cer']:.2%}" in table


def test_a_missing_english_folder_stops_the_demo_before_it_writes_anything(tmp_path):
    import pytest

    from whisper_lora.errors import UserError

    corpus = mini_corpus(tmp_path, {"train": 1, "dev": 1, "test": 1, "test_new_words": 1})
    with pytest.raises(UserError, match="nowhere: no English clips with a transcripts.json"):
        demo.run(build_config(DemoConfig, overrides={"output_dir": str(tmp_path / "out"), "corpus_dir": str(corpus),
                                                     "english_dir": str(tmp_path / "nowhere")}))
    assert not (tmp_path / "out").exists()
