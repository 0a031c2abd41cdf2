"""Model cards the Hub parses, in the folders train, evaluate and export touch, and `push` up to its upload
call (no Hub is reachable here)."""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import assert_one_line_error, cli_here

huggingface_hub = pytest.importorskip("huggingface_hub")


def test_a_trained_adapter_carries_a_card_that_evaluate_scores_and_push_uploads(mandarin_adapter, tmp_path, capsys,
                                                                                 monkeypatch):
    from huggingface_hub import HfApi, ModelCard

    adapter = tmp_path / "zh-adapter"
    shutil.copytree(mandarin_adapter[0], adapter)
    card = ModelCard.load(adapter / "README.md")  # huggingface_hub's own parser
    assert card.data.base_model == "openai/whisper-base" and card.data.library_name == "peft"
    assert card.data.language == ["zh"] and card.data.datasets == ["mandarin/train"]
    assert "whisper-lora" in card.data.tags and "lora_r: 16" in card.text  # the training config, in the body

    rows = mandarin_adapter[1][:2]
    manifest = tmp_path / "heldout.jsonl"
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    result = cli_here(capsys, "evaluate", str(manifest), "--models", str(adapter), "--language", "zh")
    assert result.returncode == 0, result.stderr[-2000:]
    card = ModelCard.load(adapter / "README.md")
    cer = {r.metric_type: r for r in card.data.eval_results}["cer"]
    printed = next(line for line in result.stdout.splitlines() if str(adapter) in line and "%" in line)
    assert f"{cer.metric_value:.2f}%" in printed  # the model-index holds the CER the table printed
    assert cer.task_type == "automatic-speech-recognition" and cer.dataset_type.endswith("/heldout")
    assert card.data.language == ["zh"] and card.data.base_model == "openai/whisper-base"  # the rest kept

    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw))
                        or f"https://huggingface.co/{repo_id}")
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw)) or "commit")
    result = cli_here(capsys, "push", str(adapter), "--repo-id", "me/zh-adapter", "--private")
    assert result.returncode == 0, result.stderr
    (_, repo, create), (_, upload) = calls
    assert repo == "me/zh-adapter" and create["private"] and create["exist_ok"]
    assert upload["folder_path"] == str(adapter) and upload["repo_id"] == "me/zh-adapter"
    assert "*.partial/**" in upload["ignore_patterns"]


def test_push_refuses_what_the_hub_would_not_take(tmp_path, capsys):
    (tmp_path / "bare").mkdir()
    assert_one_line_error(cli_here(capsys, "push", str(tmp_path / "bare"), "--repo-id", "me/x"), "no model card")
    assert_one_line_error(cli_here(capsys, "push", str(tmp_path / "bare"), "--repo-id", "x"), "ORG/NAME")
    (tmp_path / "carded").mkdir()
    (tmp_path / "carded" / "README.md").write_text("---\nbase_model: openai/whisper-base\n---\n# x\n")
    # offline here: the upload's failure is one line too
    assert_one_line_error(cli_here(capsys, "push", str(tmp_path / "carded"), "--repo-id", "me/x"), "could not push")
