import dataclasses

import pytest
import yaml

from whisper_lora.config import EvaluateConfig, ServeConfig, TrainConfig, build_config
from whisper_lora.rundir import prepare_run_dir, save_config
from whisper_lora.errors import UserError


def test_defaults_yaml_then_flags(tmp_path):
    (tmp_path / "c.yaml").write_text("train_manifest: t.jsonl\nlora-r: 8\nlearning_rate: 0.0005\n")
    config = build_config(TrainConfig, str(tmp_path / "c.yaml"), {"lora_r": 16}, check_inputs=False)
    assert config.lora_r == 16  # flag beats YAML
    assert config.learning_rate == 0.0005  # YAML beats default
    assert config.lora_alpha == TrainConfig.lora_alpha  # default kept


def test_unknown_yaml_key(tmp_path):
    (tmp_path / "c.yaml").write_text("train_manifest: t.jsonl\nlora_rank: 8\n")
    with pytest.raises(UserError, match="c.yaml: unknown option 'lora_rank'"):
        build_config(TrainConfig, str(tmp_path / "c.yaml"), check_inputs=False)


def test_invalid_yaml_names_line(tmp_path):
    (tmp_path / "c.yaml").write_text("train_manifest: t.jsonl\nlora_r: [8\n")
    with pytest.raises(UserError, match=r"c.yaml: invalid YAML at line"):
        build_config(TrainConfig, str(tmp_path / "c.yaml"), check_inputs=False)


def test_types_and_choices_are_checked():
    with pytest.raises(UserError, match="--lora-r: cannot read 'eight' as int"):
        build_config(TrainConfig, overrides={"train_manifest": "t", "lora_r": "eight"}, check_inputs=False)
    with pytest.raises(UserError, match="--precision must be one of"):
        build_config(TrainConfig, overrides={"train_manifest": "t", "precision": "fp8"}, check_inputs=False)


@pytest.mark.parametrize("overrides, message", [
    ({"port": 0}, "--port must lie in 1-65535, got 0"),
    ({"max_batch": 0}, "--max-batch must be positive, got 0"),
    ({"batch_wait_ms": -1}, "--batch-wait-ms must be >= 0, got -1.0"),
    ({"adapters": "adapters", "backend": "ct2"}, "--adapters and --backend ct2 conflict"),
])
def test_serve_options_are_checked_before_a_model_loads(overrides, message):
    with pytest.raises(UserError, match=message):
        build_config(ServeConfig, overrides=overrides, check_inputs=False)
    assert build_config(ServeConfig, overrides={"batch_wait_ms": 0}, check_inputs=False).batch_wait_ms == 0


def test_conflicting_options_name_both():
    with pytest.raises(UserError, match="--resume and --overwrite conflict"):
        build_config(TrainConfig, overrides={"train_manifest": "t", "resume": True, "overwrite": True}, check_inputs=False)


def test_required_option():
    with pytest.raises(UserError, match="--train-manifest is required"):
        build_config(TrainConfig, check_inputs=False)


def test_list_option_from_yaml_and_string(tmp_path):
    config = build_config(EvaluateConfig, overrides={"manifest": "m", "models": "a,b"}, check_inputs=False)
    assert config.models == ["a", "b"]


def test_yaml_reads_numbers_the_way_people_write_them(tmp_path):
    """PyYAML reads `1e-4` as text and people quote numbers and write lists on one line; YAML's `yes` is
    still never a number."""
    (tmp_path / "c.yaml").write_text("train_manifest: t.jsonl\nlearning_rate: 1e-4\nlora_r: '8'\n"
                                     "target_modules: q_proj, v_proj\npack: yes\n")
    config = build_config(TrainConfig, str(tmp_path / "c.yaml"), check_inputs=False)
    assert (config.learning_rate, config.lora_r, config.target_modules, config.pack) == \
        (1e-4, 8, ["q_proj", "v_proj"], True)
    (tmp_path / "c.yaml").write_text("train_manifest: t.jsonl\nlora_r: yes\n")
    with pytest.raises(UserError, match="c.yaml: lora_r: cannot read True as int"):
        build_config(TrainConfig, str(tmp_path / "c.yaml"), check_inputs=False)


def test_configs_are_frozen():
    config = build_config(TrainConfig, overrides={"train_manifest": "t"}, check_inputs=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lora_r = 4


def test_run_dir_refuses_a_different_run(tmp_path):
    first = build_config(TrainConfig, overrides={"train_manifest": "t", "lora_r": 8}, check_inputs=False)
    prepare_run_dir(first, tmp_path / "run")
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["lora_r"] == 8
    second = dataclasses.replace(first, lora_r=16)
    with pytest.raises(UserError, match=r"run: output folder holds a different run \(changed: lora_r\)"):
        prepare_run_dir(second, tmp_path / "run")
    with pytest.raises(UserError, match="already holds this run; pass --resume"):
        prepare_run_dir(first, tmp_path / "run")
    prepare_run_dir(first, tmp_path / "run", resume=True)
    prepare_run_dir(second, tmp_path / "run", overwrite=True)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["lora_r"] == 16


def test_run_dir_refuses_foreign_folder(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "thesis.tex").write_text("precious")
    with pytest.raises(UserError, match="holds no whisper-lora run"):
        prepare_run_dir(build_config(TrainConfig, overrides={"train_manifest": "t"}, check_inputs=False), tmp_path / "x")
    assert (tmp_path / "x" / "thesis.tex").exists()


def test_save_config_roundtrip(tmp_path):
    config = build_config(TrainConfig, overrides={"train_manifest": "t", "target_modules": ["q_proj", "k_proj"]}, check_inputs=False)
    save_config(config, tmp_path / "c.yaml")
    assert build_config(TrainConfig, str(tmp_path / "c.yaml"), check_inputs=False) == config


def test_yaml_key_without_value_and_non_finite_numbers(tmp_path):
    (tmp_path / "c.yaml").write_text("train_manifest: t.jsonl\nbatch_size:\n")
    with pytest.raises(UserError, match="option batch-size needs a value"):
        build_config(TrainConfig, str(tmp_path / "c.yaml"), check_inputs=False)
    with pytest.raises(UserError, match="--epochs: must be finite"):
        build_config(TrainConfig, overrides={"train_manifest": "t", "epochs": "nan"}, check_inputs=False)
    with pytest.raises(UserError, match="--max-new-tokens must be at most 444"):
        build_config(EvaluateConfig, overrides={"manifest": "m", "max_new_tokens": 500}, check_inputs=False)


def test_deepspeed_configs_shipped_parse_and_bad_ones_are_refused_up_front(tmp_path):
    from conftest import REPO

    for name in ("zero2", "zero3"):
        path = REPO / "configs" / "deepspeed" / f"{name}.json"
        config = build_config(TrainConfig, overrides={"train_manifest": "t", "deepspeed": str(path)}, check_inputs=False)
        assert config.deepspeed == str(path)
    broken = tmp_path / "ds.json"
    broken.write_text('{"zero_optimization": {"stage": 2,}}')
    with pytest.raises(UserError, match=r"ds.json: --deepspeed config is not valid JSON \(line 1"):
        build_config(TrainConfig, overrides={"train_manifest": "t", "deepspeed": str(broken)}, check_inputs=False)
    broken.write_text('{"zero_optimization": {"stage": 5}}')
    with pytest.raises(UserError, match="zero_optimization.stage 0-3"):
        build_config(TrainConfig, overrides={"train_manifest": "t", "deepspeed": str(broken)}, check_inputs=False)
    with pytest.raises(UserError, match="--deepspeed and --load-in-8bit conflict"):
        build_config(TrainConfig, overrides={"train_manifest": "t", "load_in_8bit": True,
                                             "deepspeed": str(REPO / "configs" / "deepspeed" / "zero2.json")})


def test_ui_passes_its_key_and_placement_to_the_server_it_starts(monkeypatch):
    from whisper_lora.config import UIConfig
    from whisper_lora.stages import serve, ui

    started = []
    monkeypatch.setattr(serve, "run", started.append)
    ui.run(build_config(UIConfig, overrides={"api_key": "s3cret", "device": "cpu", "dtype": "bfloat16",
                                             "browser": False, "port": 7999}))
    (config,) = started
    assert (config.api_key, config.device, config.dtype, config.port) == ("s3cret", "cpu", "bfloat16", 7999)
    with pytest.raises(UserError, match="--device must be"):
        build_config(UIConfig, overrides={"device": "gpu0"})
