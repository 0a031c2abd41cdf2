"""--device and --dtype resolved for both backends (the CPU here; GPU rules as pure functions)."""
import pytest
import torch

from whisper_lora.devices import check_device, ct2_compute_type, ct2_placement, resolve_device, resolve_dtype
from whisper_lora.errors import UserError


def test_spellings_are_checked_before_anything_loads():
    for good in ("auto", "cpu", "cuda", "cuda:1", "mps"):
        check_device(good)
    for bad in ("gpu", "cuda:", "cuda:x", "CPU", "tpu"):
        with pytest.raises(UserError, match="--device must be auto"):
            check_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only case")
def test_auto_is_the_cpu_without_a_gpu_and_a_missing_gpu_is_refused():
    assert resolve_device("auto") == resolve_device(None) == "cpu"
    with pytest.raises(UserError, match=r"--device cuda: no CUDA GPU is visible to torch .*docs/gpu.md"):
        resolve_device("cuda")


def test_dtype_defaults_follow_the_device():
    assert resolve_dtype("auto", "cuda") == resolve_dtype(None, "cuda:1") == torch.float16
    assert resolve_dtype("auto", "cpu") == resolve_dtype("auto", "mps") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16 and resolve_dtype("float16", "cuda") == torch.float16
    with pytest.raises(UserError, match="--dtype must be one of"):
        resolve_dtype("fp8", "cpu")


def test_ct2_compute_type_defaults_per_device_and_an_explicit_one_wins():
    assert ct2_compute_type("cuda", None) == ct2_compute_type("cuda", "auto") == "float16"
    assert ct2_compute_type("cuda", "auto", "int8_float16") == "int8_float16"
    assert ct2_compute_type("cpu", "auto") == "default"  # as stored, computed as the CPU can
    assert ct2_compute_type("cpu", "bfloat16") == "bfloat16"
    assert ct2_compute_type("cpu", "float32", "int8") == "int8"
    assert ct2_placement("cpu", "bfloat16", "default") == ("cpu", 0, "bfloat16")
    with pytest.raises(UserError, match="CTranslate2 runs on CPUs and CUDA GPUs only"):
        ct2_placement("mps", None, "default")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only case")
def test_a_missing_gpu_is_refused_in_one_line_before_a_server_starts(capsys):
    from conftest import cli_here

    for args in (["--device", "cuda:1"], ["--backend", "ct2", "--device", "cuda"]):
        result = cli_here(capsys, "serve", "--port", "8999", *args)
        assert result.returncode == 2, result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert "--device cuda" in line and "docs/gpu.md" in line
    with pytest.raises(UserError, match=r"CTranslate2 sees 0 CUDA device\(s\)"):
        ct2_placement("cuda:0", None, "default")
