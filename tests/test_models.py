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
    converted = __import__("pathlib").Path(first.location)
    assert converted != ct2 and json.loads((converted / "config.json").read_text())["vocab_size"] == 51864
    marker = converted / ".whisper-lora-converted"
    written = marker.stat().st_mtime_ns
    assert resolve_model(str(ct2)).location == first.location
    assert marker.stat().st_mtime_ns == written  # reused from the cache, not converted again


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


def test_an_adapter_of_the_embedded_model_names_a_base_anyone_can_load(mandarin_adapter, base_model_dir):
    """The adapter records openai/whisper-base: peft loads it onto that model anywhere, and whisper-lora
    loads it here with no Hub, the embedded copy standing in for the hub id."""
    import torch
    from peft import PeftModel
    from transformers import WhisperForConditionalGeneration

    adapter, _ = mandarin_adapter
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "openai/whisper-base"
    assert resolve_model("openai/whisper-base").location == str(base_model_dir)  # HF_HUB_OFFLINE in the tests
    ours, _ = load_model(str(adapter))
    theirs = PeftModel.from_pretrained(WhisperForConditionalGeneration.from_pretrained(base_model_dir), adapter).eval()
    features = torch.randn(1, 80, 3000)
    ids = torch.tensor([[50258, 50260, 50359, 50363]])
    with torch.no_grad():
        torch.testing.assert_close(ours(input_features=features, decoder_input_ids=ids).logits,
                                   theirs(input_features=features, decoder_input_ids=ids).logits)


def test_a_recorded_encoder_context_is_read_and_a_bad_one_named(tmp_path):
    from whisper_lora.errors import UserError
    from whisper_lora.models import DECODING_FILE, recorded_audio_ctx

    assert recorded_audio_ctx(tmp_path) is None  # nothing recorded: each command's own default
    (tmp_path / DECODING_FILE).write_text('{"audio_ctx": 5.0, "trained_with": "acft"}')
    assert recorded_audio_ctx(tmp_path) == 5.0
    for bad in ('{"audio_ctx": "soon"}', '{"audio_ctx": 0.2}', '[5]', 'not json'):
        (tmp_path / DECODING_FILE).write_text(bad)
        with pytest.raises(UserError, match=DECODING_FILE):
            recorded_audio_ctx(tmp_path)
