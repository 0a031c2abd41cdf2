import os
import subprocess
import sys

import pytest

from whisper_lora.allocator import return_freed_blocks_to_os

# Training's allocation pattern in miniature: activation-sized blocks freed and re-allocated, with
# small long-lived tensors (optimizer state, logs) allocated between them.
PATTERN = """
import sys
import torch
from whisper_lora.allocator import return_freed_blocks_to_os
if sys.argv[1] == "policy":
    assert return_freed_blocks_to_os()
def resident_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
before, kept, worst = resident_mb(), [], 0.0
for size in (6_000_000, 7_000_000, 5_000_000, 8_000_000, 6_500_000):  # 20-32 MB activation-sized blocks
    activations = []
    for _ in range(20):
        activations.append(torch.ones(size))
        kept.append(torch.ones(1000))
    del activations
    worst = max(worst, resident_mb() - before)
print(worst)
"""


def resident_after_free(mode: str) -> float:
    # 4 KB pages: huge-page alignment changes block sizes and hides the pattern this test is about.
    env = dict(os.environ, THP_MEM_ALLOC_ENABLE="0")
    done = subprocess.run([sys.executable, "-c", PATTERN, mode], capture_output=True, text=True, check=True, env=env)
    return float(done.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux") or not return_freed_blocks_to_os(),
                    reason="glibc allocator policy")
def test_freed_activation_blocks_go_back_to_the_os_under_the_training_policy():
    assert resident_after_free("default") > 20  # freed blocks trapped in the heap stay resident
    assert resident_after_free("policy") < 10


def test_train_applies_the_policy_only_when_asked(tiny_model_dir, tiny_corpus, tmp_path, monkeypatch):
    from test_train import tiny_train_config
    from whisper_lora.stages import train

    calls = []
    monkeypatch.setattr(train, "return_freed_blocks_to_os", lambda: calls.append(1) or True)
    for low_memory in (False, True):
        train.run(tiny_train_config(tiny_model_dir, tiny_corpus, tmp_path / str(low_memory), max_steps=1,
                                    dev_manifest=None, low_cpu_memory=low_memory))
    assert calls == [1]
