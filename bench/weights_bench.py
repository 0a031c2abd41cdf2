"""Weight memory of the embedded whisper-base as training loads it: fp32, 8-bit and 4-bit (bitsandbytes).

    python bench/weights_bench.py        # prints a table, writes bench/results/weights_<host>.json

`get_memory_footprint()` counts parameters and buffers in their stored types: the figure that 8/4-bit
loading shrinks. The token embedding, tied to the output projection, stays in full precision.
"""
from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MIB = 2 ** 20


def main() -> None:
    from whisper_lora.models import load_model

    rows = {}
    for name, quantization in (("fp32", None), ("8-bit", "8bit"), ("4-bit NF4", "4bit")):
        model, _ = load_model(None, quantization=quantization)
        rows[name] = {"bytes": model.get_memory_footprint(),
                      "parameters": sum(p.numel() for p in model.parameters())}
        del model
    base = rows["fp32"]["bytes"]
    print("| weights | MiB | vs fp32 |\n|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['bytes'] / MIB:.0f} | {row['bytes'] / base:.2f}x |")
    out = REPO / "bench" / "results" / f"weights_{platform.node() or 'host'}.json"
    out.write_text(json.dumps({"machine": platform.node(), "model": "embedded whisper-base", "weights": rows}, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
