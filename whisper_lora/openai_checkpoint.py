"""A transformers Whisper -> an openai-whisper checkpoint (`whisper.load_model(path)` loads it).

openai-whisper's checkpoint is `torch.save({"dims": ModelDimensions fields, "model_state_dict": ...})` with
openai's parameter names (which whisper.cpp uses too). transformers' `convert_openai_to_hf.py` goes the other
way; this inverts its renames. openai-whisper looks alignment heads up by model *name*, which a path is
not, so the checkpoint also carries them under "alignment_heads" (base85 of the gzipped boolean mask, the
form `model.set_alignment_heads` takes and openai's own table uses); `load_model` ignores the extra key.
"""
from __future__ import annotations

import base64
import gzip
from pathlib import Path

import numpy as np

# transformers' module names inside a layer -> openai/whisper's (and whisper.cpp's)
LAYER_NAMES = {
    "self_attn.k_proj": "attn.key", "self_attn.q_proj": "attn.query", "self_attn.v_proj": "attn.value",
    "self_attn.out_proj": "attn.out", "self_attn_layer_norm": "attn_ln",
    "encoder_attn.q_proj": "cross_attn.query", "encoder_attn.k_proj": "cross_attn.key",
    "encoder_attn.v_proj": "cross_attn.value", "encoder_attn.out_proj": "cross_attn.out",
    "encoder_attn_layer_norm": "cross_attn_ln", "fc1": "mlp.0", "fc2": "mlp.2", "final_layer_norm": "mlp_ln",
}
OTHER_NAMES = {
    "encoder.layer_norm.bias": "encoder.ln_post.bias", "encoder.layer_norm.weight": "encoder.ln_post.weight",
    "encoder.embed_positions.weight": "encoder.positional_embedding",
    "decoder.layer_norm.bias": "decoder.ln.bias", "decoder.layer_norm.weight": "decoder.ln.weight",
    "decoder.embed_positions.weight": "decoder.positional_embedding",
    "decoder.embed_tokens.weight": "decoder.token_embedding.weight",
}


def openai_name(hf_name: str) -> str | None:
    """openai/whisper's (and whisper.cpp's) name for a transformers state-dict entry; None for the output
    projection, which is the token embedding again."""
    if hf_name == "proj_out.weight":
        return None
    parts = hf_name.removeprefix("model.").split(".")
    if parts[1] == "layers":  # encoder.layers.3.self_attn.q_proj.weight -> encoder.blocks.3.attn.query.weight
        return ".".join([parts[0], "blocks", parts[2], LAYER_NAMES[".".join(parts[3:-1])], parts[-1]])
    name = ".".join(parts)
    return OTHER_NAMES.get(name, name)


def dims_of(config) -> dict:
    """openai-whisper's ModelDimensions from a transformers WhisperConfig."""
    return dict(n_mels=config.num_mel_bins, n_vocab=config.vocab_size, n_audio_ctx=config.max_source_positions,
                n_audio_state=config.d_model, n_audio_head=config.encoder_attention_heads,
                n_audio_layer=config.encoder_layers, n_text_ctx=config.max_target_positions,
                n_text_state=config.d_model, n_text_head=config.decoder_attention_heads,
                n_text_layer=config.decoder_layers)


def alignment_heads_b85(pairs, n_layer: int, n_head: int) -> bytes:
    mask = np.zeros((n_layer, n_head), dtype=bool)
    for layer, head in pairs:
        mask[layer, head] = True
    return base64.b85encode(gzip.compress(mask.tobytes(), mtime=0))


def write_openai(model, path: Path, dtype: str = "float16") -> Path:
    """Write `model` (a transformers WhisperForConditionalGeneration, LoRA merged) as an openai-whisper
    checkpoint, float16 as openai publishes theirs (or float32)."""
    import torch

    cast = getattr(torch, dtype)
    state = {}
    for hf_name, tensor in model.state_dict().items():
        if (name := openai_name(hf_name)) is not None:
            state[name] = tensor.detach().to("cpu", cast).contiguous()
    checkpoint = {"dims": dims_of(model.config), "model_state_dict": state}
    pairs = getattr(model.generation_config, "alignment_heads", None)
    if pairs:
        checkpoint["alignment_heads"] = alignment_heads_b85(pairs, model.config.decoder_layers,
                                                            model.config.decoder_attention_heads)
    torch.save(checkpoint, path)
    return Path(path)


def load_openai(path: Path, device: str = "cpu"):
    """`whisper.load_model(path)`, then the alignment heads the checkpoint carries (word timestamps)."""
    import torch
    import whisper

    model = whisper.load_model(str(path), device=device)
    heads = torch.load(path, map_location="cpu", weights_only=True).get("alignment_heads")
    if heads:
        model.set_alignment_heads(heads)
    return model


class OpenAIWhisperRunner:
    """An openai-whisper checkpoint run by openai-whisper itself: what the parity gate scores, with the
    `transcribe_batch` shape of our backends. A clip of up to 30 s goes the way openai-whisper's README
    decodes one (`pad_or_trim` the audio, `log_mel_spectrogram`, `decode`); longer audio through
    `transcribe`, which pads the spectrogram instead of the audio and so reads some hard clips differently
    with the same weights (tiny.en: 6 of 10 test clips, the same WER)."""

    def __init__(self, path: Path):
        self.model = load_openai(path)

    def transcribe_batch(self, audios, languages, options):
        import whisper

        from .decode.types import Segment, TranscriptionInfo

        results = []
        for audio, language in zip(audios, languages):
            audio = np.asarray(audio, np.float32)
            if len(audio) <= whisper.audio.N_SAMPLES:
                mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(audio), self.model.dims.n_mels)
                out = whisper.decode(self.model, mel.to(self.model.device), whisper.DecodingOptions(
                    task=options.task, language=language, temperature=options.temperature[0], fp16=False,
                    without_timestamps=options.without_timestamps, sample_len=options.max_new_tokens))
                segments = [Segment(0, 0.0, len(audio) / whisper.audio.SAMPLE_RATE, out.text.strip())]
                detected = out.language
            else:
                out = whisper.transcribe(self.model, audio, language=language, task=options.task, fp16=False,
                                         temperature=options.temperature, verbose=None,
                                         without_timestamps=options.without_timestamps,
                                         condition_on_previous_text=options.condition_on_previous_text,
                                         compression_ratio_threshold=options.compression_ratio_threshold,
                                         logprob_threshold=options.log_prob_threshold,
                                         no_speech_threshold=options.no_speech_threshold)
                segments = [Segment(i, s["start"], s["end"], s["text"].strip()) for i, s in enumerate(out["segments"])]
                detected = out.get("language")
            results.append((segments, TranscriptionInfo(detected or language, None,
                                                        len(audio) / whisper.audio.SAMPLE_RATE)))
        return results
