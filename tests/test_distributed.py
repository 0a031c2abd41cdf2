"""Real multi-process training on CPU (gloo): torchrun and accelerate launch, same command line."""
import json
import shutil
import sys

import pytest

from conftest import REPO, free_port, run_launcher

GLOBAL_BATCH = 4
STEPS = 4


def train_args(tiny_model_dir, corpus, out, per_process_batch: int) -> list[str]:
    return ["train", "--train-manifest", str(corpus / "train.jsonl"), "--dev-manifest", str(corpus / "dev.jsonl"),
            "--model", str(tiny_model_dir), "--output-dir", str(out), "--batch-size", str(per_process_batch),
            "--max-steps", str(STEPS), "--eval-steps", "2", "--logging-steps", "1", "--lora-r", "4",
            "--lora-dropout", "0", "--no-tensorboard", "--max-new-tokens", "8", "--eval-batch-size", "2",
            "--timestamp-fraction", "0", "--warmup-steps", "0"]


def losses(out) -> list[float]:
    return [h["loss"] for h in json.loads((out / "metrics.json").read_text())["history"] if "loss" in h]


@pytest.fixture(scope="session")
def single_process(tiny_model_dir, tmp_path_factory):
    """The reference: the same run in one process, trained once per `pytest` run (xdist workers take turns at a
    lock, the first trains, the others read its metrics) and in this process: only the runs under test need
    launchers of their own."""
    from filelock import FileLock

    from conftest import DEMO, session_root
    from whisper_lora.cli import main

    root = session_root(tmp_path_factory)
    corpus, out = root / "distributed-corpus", root / "distributed-single"
    with FileLock(str(root / "distributed.lock")):
        if not (out / "metrics.json").is_file():
            rows = (DEMO / "train.jsonl").read_text(encoding="utf-8").splitlines()
            (corpus / "audio").mkdir(parents=True, exist_ok=True)
            for line in rows[:20]:
                path = json.loads(line)["audio"]["path"]
                shutil.copy(DEMO / path, corpus / path)
            (corpus / "train.jsonl").write_text("\n".join(rows[:16]) + "\n", encoding="utf-8")
            (corpus / "dev.jsonl").write_text("\n".join(rows[16:20]) + "\n", encoding="utf-8")
            shutil.rmtree(out, ignore_errors=True)  # a worker that died mid-run
            assert main([*train_args(tiny_model_dir, corpus, out, GLOBAL_BATCH)]) == 0
    return corpus, losses(out)


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(launcher, tiny_model_dir, single_process,
                                                                        tmp_path):
    corpus, reference = single_process
    args = train_args(tiny_model_dir, corpus, tmp_path / "ddp", GLOBAL_BATCH // 2)
    if launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
                   "-m", "whisper_lora", *args]
    else:
        # On a machine without GPUs, `accelerate launch --num-processes 2` alone starts ONE process;
        # --multi-gpu is accelerate's switch for "N processes under torch elastic", GPUs or not.
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi-gpu", "--num-processes", "2",
                   "--main-process-port", str(free_port()), "-m", "whisper_lora", *args]
    result = run_launcher(command)
    got = losses(tmp_path / "ddp")
    assert len(got) == len(reference) == STEPS
    # Same data, same global batch, no dropout: the curves agree to float rounding (all-reduce order,
    # per-rank token means). A rank training alone on all data would drift by ~1e-2 within 4 steps.
    for a, b in zip(got, reference):
        assert abs(a - b) < 2e-3, (got, reference)
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["samples_seen"] == STEPS * GLOBAL_BATCH
    assert any("dev_cer" in h for h in metrics["history"])  # evaluation ran and did not hang
    # Only rank 0 writes: one adapter, one set of checkpoints.
    assert (tmp_path / "ddp" / "adapter" / "adapter_model.safetensors").is_file()
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_on_two_cpu_processes_matches_one_process_saves_and_resumes(stage, tiny_model_dir,
                                                                                    single_process, tmp_path):
    """ZeRO-2 (optimizer state and gradients sharded) and ZeRO-3 (weights too), on the CPU over gloo: the
    loss curve of one process with the same global batch; one adapter, gathered from the shards, that
    peft loads; and a resume from the step-2 checkpoint that ends where the uninterrupted run ended
    (under ZeRO-3, whose checkpoints hold every kind of shard; ZeRO-2's are a subset, and a third
    two-process run would cost 30 s of the suite)."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import WhisperForConditionalGeneration

    pytest.importorskip("deepspeed")
    corpus, reference = single_process
    out = tmp_path / "zero"
    args = [*train_args(tiny_model_dir, corpus, out, GLOBAL_BATCH // 2), "--save-steps", "2",
            "--deepspeed", str(REPO / "configs" / "deepspeed" / f"zero{stage}.json")]

    def launch(*extra: str):
        return run_launcher([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                             str(free_port()), "-m", "whisper_lora", *args, *extra],
                            env={"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")})

    result = launch()
    # DeepSpeed's shared-memory kernel (inference only) is not compiled for training: ~40 s per new environment
    assert not (tmp_path / "extensions" / "deepspeed_shm_comm").exists()
    got = losses(out)
    assert len(got) == len(reference) == STEPS
    for a, b in zip(got, reference):
        assert abs(a - b) < 2e-3, (got, reference)
    adapter = load_file(out / "last" / "adapter_model.safetensors")
    assert adapter and all(t.numel() > 0 for t in adapter.values())  # whole matrices, not a rank's shard
    assert any(t.abs().sum() > 0 for name, t in adapter.items() if "lora_B" in name)  # trained (B starts at 0)
    PeftModel.from_pretrained(WhisperForConditionalGeneration.from_pretrained(tiny_model_dir), out / "last")
    assert "Traceback" not in result.stderr
    if stage == 2:
        return

    # Interrupted after step 2: the step-4 checkpoint and the final files are gone; resume from step 2.
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["step-0000002", "step-0000004"]
    assert (checkpoints[0] / "deepspeed").is_dir()
    shutil.rmtree(checkpoints[1])
    shutil.rmtree(out / "last")
    (out / "metrics.json").unlink()
    resumed = launch("--resume")
    assert "resuming from" in resumed.stdout + resumed.stderr
    again = load_file(out / "last" / "adapter_model.safetensors")
    for name, tensor in adapter.items():
        assert (again[name] - tensor).abs().max() < 1e-5, name
