import json

import pytest
import torch

from conftest import SPEECH_EN
from whisper_lora.audio import load_audio
from whisper_lora.config import MergeConfig, build_config
from whisper_lora.errors import UserError
from dataclasses import replace

from whisper_lora.decode import GREEDY, TransformersBackend
from whisper_lora.lora import apply_lora, save_adapter
from whisper_lora.models import load_model
from whisper_lora.stages import merge


SHORT = replace(GREEDY, max_new_tokens=20)


@pytest.fixture(scope="module")
def trained_adapter(tiny_model_dir, tmp_path_factory):
    """An adapter with non-zero LoRA B matrices, so merging really changes the weights."""
    model, processor = load_model(str(tiny_model_dir))
    peft_model = apply_lora(model, 4, 8, 0.0, ["q_proj", "v_proj", "fc1"])
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    folder = tmp_path_factory.mktemp("adapter")
    save_adapter(peft_model, processor, folder, str(tiny_model_dir))
    return folder


def test_merged_and_unmerged_give_identical_greedy_transcripts(trained_adapter, tmp_path):
    out = merge.run(build_config(MergeConfig, overrides={"adapter": str(trained_adapter), "output_dir": str(tmp_path / "m")}))
    clips = [load_audio(SPEECH_EN / "arctic_a0007.wav"), load_audio(SPEECH_EN / "cards" / "002.wav")]

    def tokens(model_spec):
        decoded = TransformersBackend(*load_model(model_spec), device="cpu").transcribe_batch(clips, ["en", "en"], SHORT)
        return [[t for s in segments for t in s.tokens] for segments, _ in decoded]

    unmerged, merged = tokens(str(trained_adapter)), tokens(str(out))
    assert merged == unmerged
    base = tokens(json.loads((trained_adapter / "adapter_config.json").read_text())["base_model_name_or_path"])
    assert base != merged  # the adapter really did something
    assert (out / "merge_config.yaml").is_file()


def test_merged_folder_loads_in_a_transformers_pipeline(trained_adapter, tmp_path):
    from transformers import pipeline

    out = merge.run(build_config(MergeConfig, overrides={"adapter": str(trained_adapter), "output_dir": str(tmp_path / "m")}))
    clip = load_audio(SPEECH_EN / "cards" / "001.wav")
    generate = {"max_new_tokens": 5, "language": "en"}

    def heard(model, **parts) -> str:
        return pipeline("automatic-speech-recognition", model=model, device="cpu", **parts)(clip, generate_kwargs=generate)["text"]

    # the folder alone, in a stock pipeline, hears what the unmerged adapter hears in the same pipeline
    unmerged, processor = load_model(str(trained_adapter))
    expected = heard(unmerged, tokenizer=processor.tokenizer, feature_extractor=processor.feature_extractor)
    assert heard(str(out)) == expected
    base = json.loads((trained_adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert heard(base) != expected  # the adapter's change is in the folder


def test_merge_refuses_existing_output_and_non_adapters(trained_adapter, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(UserError, match="busy: output folder exists and is not empty"):
        merge.run(build_config(MergeConfig, overrides={"adapter": str(trained_adapter), "output_dir": str(tmp_path / "busy")}))
    with pytest.raises(UserError, match="is not an adapter folder"):
        merge.run(build_config(MergeConfig, overrides={"adapter": str(tmp_path), "output_dir": str(tmp_path / "o")}))
