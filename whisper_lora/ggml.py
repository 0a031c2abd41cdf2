"""A transformers Whisper -> a whisper.cpp model file (GGML), written here.

whisper.cpp converts fine-tuned Hugging Face models with `models/convert-h5-to-ggml.py`, which needs a
clone of openai/whisper (for the mel filters) and a `vocab.json` that transformers 5 no longer writes
(only `tokenizer.json`). The format is small, so it is written directly from the loaded model, the
tokenizer's vocabulary and the feature extractor's mel filters, in the layout that converter documents:

    header: magic "ggml", then 11 int32 hyper-parameters and the weight type (1 = f16, 0 = f32)
    mel filters: n_mels, n_fft_bins (int32), then n_mels x n_fft_bins float32
    vocabulary: count (int32), then per token in id order: byte length (int32), the token's bytes
    tensors: n_dims, name length, type (int32 each), the dims innermost first, the name, the data

Only the byte-level BPE vocabulary is stored (ids below <|endoftext|>'s successor); whisper.cpp numbers
the special tokens itself from the header's vocabulary size.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from .openai_checkpoint import openai_name
from .tokens import byte_decoder

GGML_MAGIC = 0x67676D6C  # "ggml"
F32, F16 = 0, 1  # whisper.cpp's weight types in this format
KEPT_F32 = {"encoder.conv1.bias", "encoder.conv2.bias", "encoder.positional_embedding", "decoder.positional_embedding"}


def bpe_vocabulary(tokenizer_json: dict) -> list[bytes]:
    """The byte-level tokens of a Whisper `tokenizer.json`, by id (special tokens left out)."""
    vocab = tokenizer_json["model"]["vocab"]
    decode = byte_decoder()
    ordered = sorted(vocab.items(), key=lambda item: item[1])
    if [i for _, i in ordered] != list(range(len(ordered))):
        raise ValueError("tokenizer.json's vocabulary ids are not 0..n-1")
    return [bytes(decode[c] for c in token) for token, _ in ordered]


def write_ggml(model, tokenizer_json: dict, mel_filters: np.ndarray, path: Path, f16: bool = True) -> Path:
    """Write `model` (a transformers WhisperForConditionalGeneration, LoRA merged) as a whisper.cpp file.
    `mel_filters`: n_mels x n_fft_bins."""
    config = model.config
    tokens = bpe_vocabulary(tokenizer_json)
    header = [config.vocab_size, config.max_source_positions, config.d_model, config.encoder_attention_heads,
              config.encoder_layers, config.max_target_positions, config.d_model, config.decoder_attention_heads,
              config.decoder_layers, config.num_mel_bins, F16 if f16 else F32]
    filters = np.ascontiguousarray(mel_filters, dtype=np.float32)
    if filters.shape[0] != config.num_mel_bins:
        raise ValueError(f"mel filters are {filters.shape}, the model has {config.num_mel_bins} mel bins")
    path = Path(path)
    with open(path, "wb") as out:
        out.write(struct.pack("<i", GGML_MAGIC))
        out.write(struct.pack(f"<{len(header)}i", *header))
        out.write(struct.pack("<ii", *filters.shape))
        out.write(filters.tobytes())
        out.write(struct.pack("<i", len(tokens)))
        for token in tokens:
            out.write(struct.pack("<i", len(token)))
            out.write(token)
        for hf_name, tensor in model.state_dict().items():
            name = openai_name(hf_name)
            if name is None:
                continue
            data = tensor.detach().float().cpu().numpy().squeeze()
            if name in ("encoder.conv1.bias", "encoder.conv2.bias"):
                data = data.reshape(-1, 1)  # whisper.cpp adds them to [frames, channels] as [channels, 1]
            kind = F16 if f16 and data.ndim >= 2 and name not in KEPT_F32 else F32
            data = data.astype(np.float16 if kind == F16 else np.float32)
            encoded = name.encode()
            out.write(struct.pack("<iii", data.ndim, len(encoded), kind))
            out.write(struct.pack(f"<{data.ndim}i", *reversed(data.shape)))
            out.write(encoded)
            out.write(np.ascontiguousarray(data).tobytes())
    return path


def mel_filters_of(processor) -> np.ndarray:
    """The model's own mel filter bank (n_mels x n_fft_bins), as its feature extractor computes features."""
    return np.asarray(processor.feature_extractor.mel_filters, dtype=np.float32).T


def tokenizer_json_of(folder: Path) -> dict:
    return json.loads((Path(folder) / "tokenizer.json").read_text(encoding="utf-8"))


class WhisperCppRunner:
    """A whisper.cpp model file run by whisper.cpp itself (pywhispercpp bundles it): what the parity gate
    scores, with the `transcribe_batch` shape of our backends."""

    def __init__(self, path: Path, threads: int | None = None):
        try:
            from pywhispercpp.model import Model
        except ImportError:
            raise ImportError("pywhispercpp") from None
        import torch

        # Exact attention: whisper.cpp 1.8 turns flash attention on by default, whose float16 accumulation
        # alone gave other words on 2 of the demo's 40 clips (none without it). That is the runtime's
        # arithmetic, not the file, which is what the gate judges; `whisper-cli -nfa` runs as the gate does.
        self.model = Model(str(path), n_threads=threads or torch.get_num_threads(), print_progress=False,
                           print_realtime=False, redirect_whispercpp_logs_to=None,
                           context_params={"flash_attn": False})

    def transcribe_batch(self, audios, languages, options):
        from .decode.types import Segment, TranscriptionInfo

        results = []
        for audio, language in zip(audios, languages):
            pieces = self.model.transcribe(np.asarray(audio, np.float32), language=language or "auto",
                                           translate=options.task == "translate", temperature=options.temperature[0],
                                           # our fallback ladder (none for the gate's greedy), and the
                                           # non-speech tokens suppressed as openai/whisper and we do
                                           temperature_inc=(options.temperature[1] - options.temperature[0]
                                                            if len(options.temperature) > 1 else 0.0),
                                           suppress_nst=True, no_timestamps=options.without_timestamps,
                                           no_context=True, max_tokens=options.max_new_tokens)
            segments = [Segment(i, p.t0 / 100, p.t1 / 100, p.text.strip()) for i, p in enumerate(pieces)]
            results.append((segments, TranscriptionInfo(language, None, len(audio) / 16000)))
        return results
