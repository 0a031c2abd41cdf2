#!/usr/bin/env python
"""Convert a Hugging Face transformers Whisper folder (config.json + model.safetensors / pytorch_model.bin)
into an openai-whisper checkpoint: torch.save({"dims": {...}, "model_state_dict": {...}}, OUT).

This inverts transformers' models/whisper/convert_openai_to_hf.py (WHISPER_MAPPING + the blocks->layers,
mlp.0/mlp.2 -> fc1/fc2 renames). proj_out.weight is dropped (tied to decoder.token_embedding in openai's
model). Weights are saved as float16 by default, like openai's published checkpoints (the CTranslate2
source of our base weights is float16 anyway, so nothing is lost).

openai's checkpoints carry no alignment heads (openai-whisper / WhisperLiveKit look them up by model *name*,
which a path is not). This script therefore also writes OUT.alignment_heads.b85: the base85(gzip(bool mask))
string for --custom-alignment-heads / custom_alignment_heads=..., built from generation_config.json's
alignment_heads (or --ct2-config's). When the mask equals openai's built-in one for --reference-name
(default: base), openai's exact string is written.

Usage (WhisperLiveKit venv; needs torch + safetensors):
  python convert_hf_to_openai.py --hf-dir ~/.cache/whisper-lora/models/whisper-base-d01c3014881c-v2 \
      --out bench/.peers/whisperlivekit/models/whisper-base-openai/base.pt --verify
"""
from __future__ import annotations

import argparse
import base64
import gzip
import json
import re
from pathlib import Path

import numpy as np
import torch

LAYER_MAP = {  # HF suffix inside a layer -> openai suffix inside a block
    "self_attn.q_proj": "attn.query",
    "self_attn.k_proj": "attn.key",
    "self_attn.v_proj": "attn.value",
    "self_attn.out_proj": "attn.out",
    "self_attn_layer_norm": "attn_ln",
    "encoder_attn.q_proj": "cross_attn.query",
    "encoder_attn.k_proj": "cross_attn.key",
    "encoder_attn.v_proj": "cross_attn.value",
    "encoder_attn.out_proj": "cross_attn.out",
    "encoder_attn_layer_norm": "cross_attn_ln",
    "fc1": "mlp.0",
    "fc2": "mlp.2",
    "final_layer_norm": "mlp_ln",
}
TOP_MAP = {
    "model.encoder.conv1": "encoder.conv1",
    "model.encoder.conv2": "encoder.conv2",
    "model.encoder.embed_positions": "encoder.positional_embedding",
    "model.encoder.layer_norm": "encoder.ln_post",
    "model.decoder.embed_tokens": "decoder.token_embedding",
    "model.decoder.embed_positions": "decoder.positional_embedding",
    "model.decoder.layer_norm": "decoder.ln",
}
LAYER_RE = re.compile(r"^model\.(encoder|decoder)\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def load_hf_state_dict(hf_dir: Path) -> dict[str, torch.Tensor]:
    st = hf_dir / "model.safetensors"
    if st.is_file():
        from safetensors.torch import load_file
        return load_file(str(st))
    pt = hf_dir / "pytorch_model.bin"
    if pt.is_file():
        return torch.load(pt, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no model.safetensors / pytorch_model.bin in {hf_dir}")


def hf_to_openai(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "proj_out.weight":
            continue  # tied to the token embedding in openai's model
        m = LAYER_RE.match(key)
        if m:
            side, idx, sub, kind = m.groups()
            if sub not in LAYER_MAP:
                raise KeyError(f"unmapped HF key {key}")
            out[f"{side}.blocks.{idx}.{LAYER_MAP[sub]}.{kind}"] = value
            continue
        stem, _, kind = key.rpartition(".")
        if stem in TOP_MAP:
            new = TOP_MAP[stem]
            # openai's positional embeddings are bare tensors (buffer / Parameter), not modules with .weight
            out[new if new.endswith("positional_embedding") else f"{new}.{kind}"] = value
            continue
        raise KeyError(f"unmapped HF key {key}")
    return out


def dims_from_config(cfg: dict) -> dict:
    return dict(
        n_mels=cfg["num_mel_bins"], n_vocab=cfg["vocab_size"],
        n_audio_ctx=cfg["max_source_positions"], n_audio_state=cfg["d_model"],
        n_audio_head=cfg["encoder_attention_heads"], n_audio_layer=cfg["encoder_layers"],
        n_text_ctx=cfg["max_target_positions"], n_text_state=cfg["d_model"],
        n_text_head=cfg["decoder_attention_heads"], n_text_layer=cfg["decoder_layers"],
    )


def heads_mask(pairs, n_layer: int, n_head: int) -> np.ndarray:
    mask = np.zeros((n_layer, n_head), dtype=bool)
    for layer, head in pairs:
        mask[layer, head] = True
    return mask


def decode_b85(dump: bytes, n_layer: int, n_head: int) -> np.ndarray:
    return np.frombuffer(gzip.decompress(base64.b85decode(dump)), dtype=bool).reshape(n_layer, n_head)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--ct2-config", type=Path, help="CTranslate2 config.json to take alignment_heads from")
    p.add_argument("--reference-name", default="base", help="openai model whose built-in heads to compare with")
    p.add_argument("--verify", action="store_true",
                   help="load into WhisperLiveKit's vendored openai-whisper model (strict) and compare with its "
                        "own HF->openai key conversion")
    a = p.parse_args()

    cfg = json.loads((a.hf_dir / "config.json").read_text())
    dims = dims_from_config(cfg)
    hf_state = load_hf_state_dict(a.hf_dir)
    dtype = getattr(torch, a.dtype)
    state = {k: v.to(dtype).contiguous() for k, v in hf_to_openai(hf_state).items()}

    pairs = None
    gen = a.hf_dir / "generation_config.json"
    if a.ct2_config:
        pairs = json.loads(a.ct2_config.read_text()).get("alignment_heads")
    elif gen.is_file():
        pairs = json.loads(gen.read_text()).get("alignment_heads")
    heads_b85 = None
    if pairs:
        mask = heads_mask(pairs, dims["n_text_layer"], dims["n_text_head"])
        heads_b85 = base64.b85encode(gzip.compress(mask.tobytes(), mtime=0)).decode()
        try:
            from whisperlivekit.whisper import _ALIGNMENT_HEADS
            ref = _ALIGNMENT_HEADS.get(a.reference_name)
        except ImportError:
            ref = None
        if ref is not None:
            same = np.array_equal(decode_b85(ref, dims["n_text_layer"], dims["n_text_head"]), mask)
            print(f"alignment heads {pairs} == openai '{a.reference_name}' built-in: {same}")
            if same:
                heads_b85 = ref.decode()

    a.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"dims": dims, "model_state_dict": state}, a.out)
    print(f"wrote {a.out} ({len(state)} tensors, {a.dtype}) dims={dims}")
    if heads_b85:
        Path(str(a.out) + ".alignment_heads.b85").write_text(heads_b85 + "\n")
        print(f"alignment heads (base85): {heads_b85}")

    if a.verify:
        from whisperlivekit.whisper import _convert_hf_state_dict
        from whisperlivekit.whisper.model import ModelDimensions, Whisper

        model = Whisper(ModelDimensions(**dims))
        model.load_state_dict(state, strict=True)  # raises on any missing / unexpected key or shape
        theirs = _convert_hf_state_dict(hf_state)
        assert set(theirs) == set(state), set(theirs) ^ set(state)
        worst = max((theirs[k].float() - state[k].float()).abs().max().item() for k in state)
        print(f"verify: strict load OK; keys identical to WhisperLiveKit's own HF conversion; "
              f"max |diff| after {a.dtype} cast = {worst:.3g}")


if __name__ == "__main__":
    main()
