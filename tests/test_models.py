import json
import shutil

import pytest

from whisper_lora.errors import UserError
from whisper_lora.models import load_model, resolve_model


def test_default_is_the_embedded_base_converted_once(base_model_dir):
    again = resolve_model("default")
    assert again.location == str(base_model_dir)
    config = json.loads((base_model_dir / "config.json").read_text())
    assert config["model_type"] == "whisper" and config["vocab_size"] == 51865 and config["d_model"] == 512


def test_transformers_folder(tiny_model_dir):
    resolved = resolve_model(str(tiny_model_dir))
    assert resolved.location == str(tiny_model_dir) and resolved.adapter is None


def test_ct2_folder_is_converted_and_cached(tmp_path):
    from whisper_lora.models import EMBEDDED_MODELS, _package_dir

    em = EMBEDDED_MODELS["tiny.en"]
    ct2 = tmp_path / "faster-whisper-tiny.en"
    shutil.copytree(_package_dir(em.package, em.pip) / em.subdir, ct2)
    first = resolve_model(str(ct2))
    assert (tmp_path / "faster-whisper-tiny.en").is_dir()
    assert json.loads((__import__("pathlib").Path(first.location) / "config.json").read_text())["vocab_size"] == 51864
    assert resolve_model(str(ct2)).location == first.location


def test_missing_folder():
    with pytest.raises(UserError, match=r"\./no/such/model: model folder not found"):
        resolve_model("./no/such/model")


def test_hub_id_is_passed_through():
    assert resolve_model("openai/whisper-small").location == "openai/whisper-small"


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The library read the variable when it was imported: set what it reads now, or the test waits out
    # network timeouts instead of taking the offline path.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="openai/whisper-nonexistent-xyz: cannot load model"):
        load_model("openai/whisper-nonexistent-xyz")


def test_not_whisper(tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError, match=r"bert: is a 'bert' model, not Whisper"):
        resolve_model(str(tmp_path / "bert"))
    (tmp_path / "random").mkdir()
    (tmp_path / "random" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="is not a Whisper model folder"):
        resolve_model(str(tmp_path / "random"))


def test_unknown_embedded_name():
    with pytest.raises(UserError, match="unknown embedded model"):
        resolve_model("embedded:large-v9")
