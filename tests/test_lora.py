"""Training methods (LoRA, DoRA, AdaLoRA, full), target presets, saving/merging, quantisation checks.

Everything runs on the tiny random Whisper from conftest; AdaLoRA is trained for real (a few dozen
optimizer steps on random decoder inputs, the path `--freeze-encoder` takes with cached encoder
outputs) because its rank reallocation only happens inside a training loop.
"""
from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from whisper_lora.config import MergeConfig, TrainConfig, build_config
from whisper_lora.errors import UserError
from whisper_lora.lora import (AdapterSpec, adapter_step_hook, apply_adapter, apply_lora, check_quantisation,
                               load_trainable_state, merge_into_base, save_adapter, trainable_state)
from whisper_lora.models import load_model, resolve_model
from whisper_lora.stages import merge

D_MODEL = 64  # of the tiny model in conftest
BASE = AdapterSpec(lora_r=4, lora_alpha=8, lora_dropout=0.0)
ADALORA = replace(BASE, method="adalora", lora_r=2, adalora_init_r=6, lora_targets="attention-mlp",
                  freeze_encoder=True, adalora_tinit=4, adalora_tfinal=8, adalora_interval=2)
ADALORA_STEPS = 30
RESUME_AT = 15  # inside the budgeting phase (steps 5..22), so allocator state matters


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops are so small that keeping two threads in step costs more than it gains,
    several times over on a shared two-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def adapted_modules(model) -> set[str]:
    return {n.split(".lora_A")[0].removeprefix("base_model.model.") for n, _ in model.named_parameters()
            if ".lora_A." in n}


def features(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(seed))


def logits(model, inputs: torch.Tensor) -> torch.Tensor:
    ids = torch.tensor([[50258, 50259, 50359, 50363, 440, 1002]])
    with torch.no_grad():
        return model.eval()(input_features=inputs, decoder_input_ids=ids).logits


def train_steps(model, optimizer, steps: range, hook: bool) -> None:
    """Real optimizer steps on random encoder outputs and labels, seeded by step (same data every run)."""
    model.train()
    for step in steps:
        generator = torch.Generator().manual_seed(step)
        hidden = torch.randn(2, 16, D_MODEL, generator=generator)
        labels = torch.randint(0, 1000, (2, 8), generator=generator)
        model(encoder_outputs=(hidden,), labels=labels).loss.backward()
        optimizer.step()
        if hook:
            adapter_step_hook(model, step)
        optimizer.zero_grad()


def optimizer_for(model) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def pattern_ranks(model) -> dict[str, int]:
    """Kept ranks per module from peft's rank pattern (keys lose the adapter name once saved)."""
    pattern = model.peft_config["default"].rank_pattern
    return {k.split(".lora_E")[0]: sum(keep) for k, keep in pattern.items()}


def nonzero_ranks(model) -> dict[str, int]:
    return {n.split(".lora_E")[0].removeprefix("base_model.model."): int((p != 0).sum())
            for n, p in model.named_parameters() if ".lora_E." in n}


# ---- LoRA and target presets -------------------------------------------------------------------

def test_default_targets_cover_encoder_and_decoder(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir))
    peft_model = apply_lora(model, 4, 8, 0.0, ["q_proj", "v_proj"])
    adapted = adapted_modules(peft_model)
    assert any(".encoder." in n for n in adapted) and any(".decoder." in n for n in adapted)
    assert all(n.endswith(("q_proj", "v_proj")) for n in adapted)


def test_unknown_target_module_lists_the_real_ones(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir))
    with pytest.raises(UserError, match="--target-modules query not found.*q_proj"):
        apply_lora(model, 4, 8, 0.0, ["query"])


def test_merge_refuses_non_finite_weights(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir))
    peft_model = apply_lora(model, 4, 8, 0.0, ["q_proj"])
    with torch.no_grad():
        next(p for n, p in peft_model.named_parameters() if "lora_B" in n).fill_(float("nan"))
    with pytest.raises(UserError, match="NaN or infinite"):
        merge_into_base(peft_model)


# Tiny model: 2 encoder layers (self-attention, fc1, fc2), 2 decoder layers (self- and cross-attention, fc1, fc2).
@pytest.mark.parametrize("preset, leaves, count", [
    ("qv", {"q_proj", "v_proj"}, 2 * 2 + 2 * 4),
    ("attention", {"q_proj", "k_proj", "v_proj", "out_proj"}, 2 * 4 + 2 * 8),
    ("attention-mlp", {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}, 2 * 6 + 2 * 10),
    ("all-linear", {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}, 2 * 6 + 2 * 10),
])
def test_each_preset_adapts_exactly_its_layers(tiny_model_dir, preset, leaves, count):
    model, _ = load_model(str(tiny_model_dir))
    expected = {n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in leaves}
    adapted = adapted_modules(apply_adapter(model, replace(BASE, lora_targets=preset), 100))
    assert adapted == expected
    assert len(adapted) == count


def test_all_linear_is_what_peft_selects_and_leaves_the_tied_head_alone(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    model, _ = load_model(str(tiny_model_dir))
    # The reason proj_out is excluded: it is the token embedding, so adapting it would change the input too.
    assert model.proj_out.weight is model.model.decoder.embed_tokens.weight
    ours = adapted_modules(apply_adapter(model, replace(BASE, lora_targets="all-linear"), 100))
    fresh, _ = load_model(str(tiny_model_dir))
    peft_all_linear = adapted_modules(get_peft_model(fresh, LoraConfig(r=4, target_modules="all-linear")))
    assert ours == peft_all_linear
    assert not any("proj_out" in n for n in ours)


@pytest.mark.parametrize("method", ["lora", "dora", "adalora", "full"])
def test_freeze_encoder_trains_only_the_decoder_with_every_method(tiny_model_dir, method):
    model, _ = load_model(str(tiny_model_dir))
    trained = apply_adapter(model, replace(BASE, method=method, freeze_encoder=True, adalora_init_r=6), 100)
    trainable = [n for n, p in trained.named_parameters() if p.requires_grad]
    assert trainable and not any(".encoder." in n for n in trainable)
    if method == "full":
        decoder = [n for n, _ in trained.model.decoder.named_parameters()]
        assert len(trainable) == len(decoder)
    else:
        assert all(".decoder." in n and (".lora_" in n) for n in trainable)


# ---- DoRA --------------------------------------------------------------------------------------

def test_dora_trains_magnitudes_and_survives_save_load_and_merge(tiny_model_dir, tmp_path):
    model, processor = load_model(str(tiny_model_dir))
    dora = apply_adapter(model, replace(BASE, method="dora"), 100)
    magnitudes = {n.split(".lora_magnitude_vector")[0].removeprefix("base_model.model.")
                  for n, p in dora.named_parameters() if ".lora_magnitude_vector." in n and p.requires_grad}
    assert magnitudes == adapted_modules(dora)
    torch.manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter: new directions and new magnitudes
        for name, param in dora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
            elif "lora_magnitude_vector" in name:
                param.mul_(1.5)
    inputs = features()
    expected = logits(dora, inputs)
    base, _ = load_model(str(tiny_model_dir))
    assert not torch.allclose(logits(base, inputs), expected, atol=1e-3)  # the adapter does change outputs
    save_adapter(dora, processor, tmp_path / "adapter", str(tiny_model_dir))
    reloaded, _ = load_model(str(tmp_path / "adapter"))
    assert torch.allclose(logits(reloaded, inputs), expected, atol=1e-5)
    assert torch.allclose(logits(merge_into_base(reloaded), inputs), expected, atol=1e-4)
    out = merge.run(build_config(MergeConfig, overrides={"adapter": str(tmp_path / "adapter"),
                                                         "output_dir": str(tmp_path / "merged")}))
    merged, _ = load_model(str(out))
    assert torch.allclose(logits(merged, inputs), expected, atol=1e-4)


# ---- AdaLoRA -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def adalora_runs(tiny_model_dir):
    """The same AdaLoRA run trained with and without the step hook, plus a snapshot for resuming."""
    runs = {}
    for hook in (True, False):
        model, processor = load_model(str(tiny_model_dir))
        torch.manual_seed(0)
        peft_model = apply_adapter(model, ADALORA, ADALORA_STEPS)
        optimizer = optimizer_for(peft_model)
        train_steps(peft_model, optimizer, range(1, RESUME_AT + 1), hook)
        snapshot = (trainable_state(peft_model), copy.deepcopy(optimizer.state_dict()))
        train_steps(peft_model, optimizer, range(RESUME_AT + 1, ADALORA_STEPS + 1), hook)
        runs[hook] = (peft_model, processor, snapshot)
    return runs


def test_adalora_hook_reallocates_ranks_between_layers(adalora_runs):
    model = adalora_runs[True][0]
    pattern = model.peft_config["default"].rank_pattern
    assert pattern  # None until the allocator has pruned
    ranks = nonzero_ranks(model)
    assert len(ranks) == 2 * 10  # decoder only: self- and cross-attention q/k/v/out, fc1, fc2, in 2 layers
    # The budget ends at target_r per layer on average, spread unevenly by importance.
    assert sum(ranks.values()) == ADALORA.lora_r * len(ranks)
    assert min(ranks.values()) < ADALORA.lora_r < max(ranks.values())
    assert pattern_ranks(model) == ranks


def test_adalora_without_the_hook_keeps_every_initial_rank(adalora_runs):
    model = adalora_runs[False][0]
    assert model.peft_config["default"].rank_pattern is None
    ranks = nonzero_ranks(model)
    assert ranks and set(ranks.values()) == {ADALORA.adalora_init_r}  # trained (E starts at 0) but never pruned


def test_adalora_adapter_saves_pruned_and_merges_to_the_same_outputs(adalora_runs, tiny_model_dir, tmp_path):
    model, processor, _ = adalora_runs[True]
    ranks = nonzero_ranks(model)
    inputs = features()
    expected = logits(model, inputs)
    save_adapter(model, processor, tmp_path / "adapter", str(tiny_model_dir))
    reloaded, _ = load_model(str(tmp_path / "adapter"))
    saved_ranks = {n.split(".lora_E")[0].removeprefix("base_model.model."): p.numel()
                   for n, p in reloaded.named_parameters() if ".lora_E." in n}
    assert saved_ranks == ranks  # pruned ranks are dropped from the files, not stored as zeros
    assert torch.allclose(logits(reloaded, inputs), expected, atol=1e-5)
    out = merge.run(build_config(MergeConfig, overrides={"adapter": str(tmp_path / "adapter"),
                                                         "output_dir": str(tmp_path / "merged")}))
    merged, _ = load_model(str(out))
    assert torch.allclose(logits(merged, inputs), expected, atol=1e-4)
    model.train()


def test_adalora_resumes_from_trainable_state_exactly(adalora_runs, tiny_model_dir):
    finished, _, (state, optimizer_state) = adalora_runs[True]
    model, _ = load_model(str(tiny_model_dir))
    torch.manual_seed(123)  # other initial adapter weights: everything must come from the snapshot
    resumed = apply_adapter(model, ADALORA, ADALORA_STEPS)
    load_trainable_state(resumed, state)
    optimizer = optimizer_for(resumed)
    optimizer.load_state_dict(optimizer_state)
    train_steps(resumed, optimizer, range(RESUME_AT + 1, ADALORA_STEPS + 1), hook=True)
    assert pattern_ranks(resumed) == pattern_ranks(finished)
    for (name, a), (_, b) in zip(resumed.named_parameters(), finished.named_parameters()):
        if b.requires_grad:
            assert torch.equal(a, b), name


def test_trainable_state_refuses_another_configuration(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir))
    state = trainable_state(apply_adapter(model, BASE, 100))
    other, _ = load_model(str(tiny_model_dir))
    with pytest.raises(UserError, match="checkpoint does not fit this run.*24 trained weights missing"):
        load_trainable_state(apply_adapter(other, replace(BASE, lora_targets="attention"), 100), state)


def test_adalora_schedule_defaults_and_refusals(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir))
    config = apply_adapter(model, replace(ADALORA, adalora_tinit=None, adalora_tfinal=None), 200).peft_config["default"]
    assert (config.tinit, config.tfinal, config.total_step, config.deltaT) == (20, 40, 200, ADALORA.adalora_interval)
    assert (config.init_r, config.target_r) == (ADALORA.adalora_init_r, ADALORA.lora_r)
    with pytest.raises(UserError, match=r"--adalora-init-r \(2\) must be greater than --lora-r \(2\)"):
        apply_adapter(load_model(str(tiny_model_dir))[0], replace(ADALORA, adalora_init_r=2), 200)
    with pytest.raises(UserError, match=r"--adalora-tinit \(4\) \+ --adalora-tfinal \(8\) leave no step of the 12"):
        apply_adapter(load_model(str(tiny_model_dir))[0], ADALORA, 12)


def test_step_hook_leaves_other_methods_alone(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir))
    lora = apply_adapter(model, BASE, 100)
    optimizer = optimizer_for(lora)
    train_steps(lora, optimizer, range(1, 3), hook=False)
    before = {n: p.clone() for n, p in lora.named_parameters()}
    adapter_step_hook(lora, 3)
    assert all(torch.equal(p, before[n]) for n, p in lora.named_parameters())


# ---- full fine-tuning --------------------------------------------------------------------------

def test_full_fine_tune_trains_everything_and_saves_a_plain_model(tiny_model_dir, tmp_path):
    model, processor = load_model(str(tiny_model_dir))
    full = apply_adapter(model, replace(BASE, method="full"), 100)
    assert all(p.requires_grad for p in full.parameters())
    optimizer = torch.optim.AdamW(full.parameters(), lr=1e-2)
    inputs = features()
    before = logits(full, inputs)
    full.train()
    full(input_features=inputs, labels=torch.tensor([[50258, 440, 1002, 50257]])).loss.backward()
    optimizer.step()
    expected = logits(full, inputs)
    assert not torch.allclose(before, expected, atol=1e-3)
    save_adapter(full, processor, tmp_path / "run", str(tiny_model_dir))
    folder = tmp_path / "run"
    assert not (folder / "adapter_config.json").exists() and (folder / "tokenizer.json").is_file()
    assert resolve_model(str(folder)).adapter is None  # --model treats it as a plain transformers model
    reloaded, _ = load_model(str(folder))
    assert torch.allclose(logits(reloaded, inputs), expected, atol=1e-6)
    assert state_matches(trainable_state(full), reloaded)


def state_matches(state: dict[str, torch.Tensor], model) -> bool:
    params = dict(model.named_parameters())
    return all(torch.equal(value, params[name]) for name, value in state.items())


# ---- quantised base weights --------------------------------------------------------------------

def test_quantisation_without_bitsandbytes_gives_the_install_hint(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(UserError, match=r"^--load-in-4bit needs the bitsandbytes package: "
                                        r"pip install 'whisper-lora\[quant\]'$"):
        check_quantisation(replace(BASE, load_in_4bit=True))


def test_no_quantisation_asked_needs_nothing():
    assert check_quantisation(BASE) is None


@pytest.mark.parametrize("options, named", [
    ({"load_in_8bit": True, "load_in_4bit": True}, ("--load-in-8bit", "--load-in-4bit")),
    ({"method": "full", "load_in_8bit": True}, ("--method full", "--load-in-8bit")),
    ({"method": "full", "load_in_4bit": True}, ("--method full", "--load-in-4bit")),
])
def test_conflicting_quantisation_options_name_both(options, named):
    with pytest.raises(UserError) as error:
        TrainConfig(train_manifest="train.jsonl", **options).validate()
    assert all(name in str(error.value) for name in named) and "conflict" in str(error.value)


@pytest.mark.parametrize("flag", ["8bit", "4bit"])
def test_quantised_model_trains_one_step_on_the_cpu(tiny_model_dir, flag):
    """bitsandbytes' CPU backend: 8-bit LLM.int8 layers, or 4-bit NF4 with double quantisation (QLoRA)."""
    bnb = pytest.importorskip("bitsandbytes")
    config = replace(BASE, **{f"load_in_{flag}": True})
    kind = check_quantisation(config)
    model, _ = load_model(str(tiny_model_dir), device="cpu", quantization=kind)
    layer = model.model.decoder.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear8bitLt if flag == "8bit" else bnb.nn.Linear4bit)
    if flag == "4bit":
        assert layer.weight.quant_state.quant_type == "nf4" and layer.weight.quant_state.nested  # double quantisation
        # fp32 compute on a CPU (bf16 there is >10x slower without bf16 units), QLoRA's bf16 on GPUs
        assert layer.compute_dtype == torch.float32
        from whisper_lora.models import bnb_config

        assert bnb_config("4bit", "cpu").bnb_4bit_compute_dtype == torch.float32
        assert layer.weight.numel() * 2 == layer.in_features * layer.out_features  # two weights a byte
    else:
        assert layer.weight.dtype == torch.int8
    assert not isinstance(model.proj_out, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))  # tied head stays exact
    peft_model = apply_adapter(model, config, 10)
    optimizer = optimizer_for(peft_model)
    peft_model.train()
    loss = peft_model(input_features=features(), labels=torch.tensor([[50258, 440, 1002, 50257]])).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: the step reached every adapter
