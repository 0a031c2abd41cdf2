"""The CT2 -> transformers conversion is lossless: same greedy tokens as CTranslate2 itself."""
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SPEECH_EN
from whisper_lora.audio import load_audio
from whisper_lora.ct2 import read_model_bin
from whisper_lora.errors import UserError
from whisper_lora.models import EMBEDDED_MODELS, _package_dir


def embedded_ct2_folder(tmp_path, name="base"):
    """A plain faster-whisper folder (model.bin joined from the package's parts)."""
    em = EMBEDDED_MODELS[name]
    folder = tmp_path / f"ct2-{name}"
    folder.mkdir()
    with open(folder / "model.bin", "wb") as out:
        for package, rel in em.parts:
            out.write((_package_dir(package, em.pip) / rel).read_bytes())
    src = _package_dir(em.package, em.pip) / em.subdir
    for item in ("config.json", "tokenizer.json", "vocabulary.txt"):
        if (src / item).exists():
            shutil.copy(src / item, folder / item)
    return folder


def test_reads_every_variable_of_the_real_model(tmp_path):
    folder = embedded_ct2_folder(tmp_path, "tiny.en")
    ckpt = read_model_bin([folder / "model.bin"])
    assert ckpt.spec == "WhisperSpec"
    assert ckpt.get("decoder/projection/weight") is ckpt.get("decoder/embeddings/weight")  # an alias
    assert ckpt.get("encoder/conv1/weight").shape == (384, 80, 3)


def test_truncated_model_bin_is_a_clear_error(tmp_path):
    data = (embedded_ct2_folder(tmp_path, "tiny.en") / "model.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cut.bin: CTranslate2 model.bin is truncated"):
        read_model_bin([tmp_path / "cut.bin"])
    (tmp_path / "v99.bin").write_bytes(struct.pack("I", 99) + data[4:100])
    with pytest.raises(UserError, match="unsupported CTranslate2 binary version 99"):
        read_model_bin([tmp_path / "v99.bin"])


def test_greedy_tokens_match_faster_whisper(tmp_path, base_model_dir):
    ctranslate2 = pytest.importorskip("ctranslate2")
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    folder = embedded_ct2_folder(tmp_path)
    reference = ctranslate2.models.Whisper(str(folder), device="cpu", compute_type="float32")
    model = WhisperForConditionalGeneration.from_pretrained(base_model_dir).eval()
    processor = WhisperProcessor.from_pretrained(base_model_dir)
    prompt = processor.tokenizer.convert_tokens_to_ids(
        ["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"])
    clips = [SPEECH_EN / "arctic_a0007.wav", SPEECH_EN / "arctic_a0009.wav", SPEECH_EN / "cards" / "005.wav"]
    for clip in clips:
        features = processor.feature_extractor(load_audio(clip), sampling_rate=16000, return_tensors="pt").input_features
        with torch.inference_mode():
            ours = model.generate(features, language="en", task="transcribe", do_sample=False, num_beams=1)[0].tolist()
        theirs = reference.generate(ctranslate2.StorageView.from_array(np.ascontiguousarray(features.numpy())),
                                    [prompt], beam_size=1)[0].sequences_ids[0]
        ours = [t for t in ours if t != model.generation_config.eos_token_id]
        assert ours == theirs, clip.name
        assert len(ours) > 3


def test_converted_tokenizer_has_timestamp_tokens(base_model_dir):
    from transformers import WhisperTokenizer

    tokenizer = WhisperTokenizer.from_pretrained(base_model_dir)
    assert tokenizer.convert_tokens_to_ids("<|0.00|>") == 50364
    assert tokenizer.convert_tokens_to_ids("<|30.00|>") == 51864
    # text encodes to the ids the shipped CTranslate2 model was trained with (its own tokenizer.json)
    from tokenizers import Tokenizer

    from whisper_lora.models import ct2_model_dir

    shipped = Tokenizer.from_file(str(Path(ct2_model_dir(None)) / "tokenizer.json"))
    for text in (" He turned sharply, and faced Gregson.", "你好，世界", " naïve café 42"):
        assert tokenizer.encode(text, add_special_tokens=False) == shipped.encode(text, add_special_tokens=False).ids
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    from transformers import GenerationConfig

    generation = GenerationConfig.from_pretrained(base_model_dir)
    assert generation.lang_to_id["<|zh|>"] == 50260 and generation.task_to_id["translate"] == 50358
    assert generation.no_timestamps_token_id == 50363 and len(generation.alignment_heads) == 8
