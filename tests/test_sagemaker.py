"""`whisper-lora sagemaker`: the job request (dry run, the SDK's own path, no AWS), local refusals, and
the in-container entry run for real on local folders standing in for the job's channels."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_cli
from whisper_lora import sagemaker_entry
from whisper_lora.config import SageMakerConfig, build_config
from whisper_lora.errors import UserError
from whisper_lora.stages import sagemaker as stage

SECRET = "wandb-secret-0123456789"


def write_yaml(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values, allow_unicode=True))
    return path


def offline_env(tmp_path: Path, **extra: str) -> dict:
    """No AWS credentials, config or instance metadata to fall back on: the dry run must need none."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SAGEMAKER_", "WANDB_"))}
    env.update(AWS_CONFIG_FILE=str(tmp_path / "no-aws-config"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-creds"),
               AWS_EC2_METADATA_DISABLED="true", XDG_CONFIG_HOME=str(tmp_path / "xdg"), PYTHONUNBUFFERED="1", **extra)
    return env


def test_dry_run_prints_the_create_training_job_request_without_credentials(tmp_path):
    augment = write_yaml(tmp_path / "my-augment.yaml", {"volume": {"p": 0.5, "min_db": -6, "max_db": 6}})
    train_yaml = write_yaml(tmp_path / "train.yaml", {
        "train_manifest": "manifests/train.jsonl", "dev_manifest": "dev.jsonl", "language": "zh",
        "model": "openai/whisper-small", "lora_r": 16, "target_modules": ["q_proj", "v_proj"], "max_steps": 3000,
        "wandb": True, "wandb_project": "from-yaml", "augment": str(augment), "output_dir": "runs/local"})
    result = subprocess.run(
        [sys.executable, "-m", "whisper_lora", "sagemaker", "--train-config", str(train_yaml),
         "--train", "s3://speech-data/zh/train", "--dev", "s3://speech-data/zh/dev",
         "--output-s3-uri", "s3://speech-jobs/whisper-lora", "--role", "arn:aws:iam::123456789012:role/SageMakerRole",
         "--instance-type", "ml.g5.12xlarge", "--instance-count", "2", "--spot", "--max-run-hours", "10",
         "--max-wait-hours", "30", "--region", "eu-west-1", "--job-name", "zh-small-7", "--wandb-project", "asr",
         "--dry-run"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env=offline_env(tmp_path, WANDB_API_KEY=SECRET, WANDB_ENTITY="speech-team"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert SECRET not in result.stdout + result.stderr
    request = json.loads(result.stdout)

    assert request["TrainingJobName"] == "zh-small-7"
    assert request["RoleArn"] == "arn:aws:iam::123456789012:role/SageMakerRole"
    image = request["AlgorithmSpecification"]["TrainingImage"]
    assert image == "763104351884.dkr.ecr.eu-west-1.amazonaws.com/pytorch-training:2.6.0-gpu-py312"
    assert request["AlgorithmSpecification"]["TrainingInputMode"] == "FastFile"
    channels = {c["ChannelName"]: c for c in request["InputDataConfig"]}
    assert set(channels) == {"train", "dev"}
    assert channels["train"]["DataSource"]["S3DataSource"]["S3Uri"] == "s3://speech-data/zh/train"
    assert all(c["InputMode"] == "FastFile" for c in channels.values())
    assert request["ResourceConfig"] == {"VolumeSizeInGB": 100, "InstanceCount": 2, "InstanceType": "ml.g5.12xlarge"}
    assert request["EnableManagedSpotTraining"] is True
    assert request["StoppingCondition"] == {"MaxRuntimeInSeconds": 36000, "MaxWaitTimeInSeconds": 108000}
    assert request["CheckpointConfig"] == {"S3Uri": "s3://speech-jobs/whisper-lora/zh-small-7/checkpoints",
                                           "LocalPath": "/opt/ml/checkpoints"}
    assert request["OutputDataConfig"]["S3OutputPath"] == "s3://speech-jobs/whisper-lora"

    # Hyperparameters are JSON-encoded by the SDK; the container decodes them into SM_HPS.
    hps = {k: json.loads(v) for k, v in request["HyperParameters"].items()}
    assert hps["sagemaker_torch_distributed_enabled"] is True  # torchrun on both nodes
    assert hps["sagemaker_program"] == "train_entry.py"
    assert hps["sagemaker_submit_directory"] == "s3://speech-jobs/whisper-lora/zh-small-7/source/sourcedir.tar.gz"
    user = {k: v for k, v in hps.items() if not k.startswith("sagemaker_")}
    assert user == {"train_manifest": "manifests/train.jsonl", "dev_manifest": "dev.jsonl", "language": "zh",
                    "model": "openai/whisper-small", "lora_r": 16, "target_modules": ["q_proj", "v_proj"],
                    "max_steps": 3000, "wandb": True, "wandb_project": "asr", "augment": "augment.yaml"}
    assert "output_dir" in result.stderr  # told that the job decides it

    environment = request["Environment"]
    assert environment["WANDB_API_KEY"] == "<masked>"
    assert environment["WANDB_PROJECT"] == "asr" and environment["WANDB_ENTITY"] == "speech-team"
    assert environment["WANDB_RUN_ID"] == environment["WANDB_RUN_GROUP"] == "zh-small-7"
    assert environment["WANDB_RESUME"] == "allow"
    assert "no AWS call made" in result.stderr


def test_source_dir_carries_this_package_its_requirements_and_an_entry_script(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    augment = write_yaml(tmp_path / "aug.yaml", {"shift": {"p": 0.3, "max_seconds": 0.5}})
    stage.build_source_dir(source, stage.requirements({"wandb"}), {"augment.yaml": augment})
    assert (source / "whisper_lora" / "stages" / "train.py").read_text() == \
        (REPO / "whisper_lora" / "stages" / "train.py").read_text()
    assert not list(source.rglob("__pycache__"))
    requirements = (source / "requirements.txt").read_text().splitlines()
    names = {r.split(">")[0].split("=")[0].split("<")[0].split(";")[0].strip() for r in requirements}
    assert {"torch", "transformers", "peft", "wandb"} <= names
    assert "pytest" not in names  # dev-only extras stay out of the job
    assert (source / "augment.yaml").read_text() == augment.read_text()
    assert "whisper_lora.sagemaker_entry" in (source / "train_entry.py").read_text()


@pytest.mark.parametrize("overrides, fragment", [
    ({"train": "s3:/speech-data/train"}, "--train 's3:/speech-data/train': must look like s3://bucket/folder"),
    ({"dev": "https://speech-data.s3.amazonaws.com/dev"}, "--dev"),
    ({"train": "s3://Speech_Data/train"}, "lower-case letters"),
    ({"output_s3_uri": "s3://ab/out"}, "--output-s3-uri 's3://ab/out': bucket name 'ab' must be 3 to 63"),
    ({"checkpoint_s3_uri": "s3://speech..data/ck"}, "--checkpoint-s3-uri"),
    ({"base_model": "s3://192.168.10.1/models"}, "--base-model"),
    ({"instance_type": "g5.2xlarge"}, "--instance-type must look like ml.<family>.<size>"),
    ({"instance_type": "ml.g5"}, "--instance-type"),
    ({"instance_count": 0}, "--instance-count must be at least 1"),
    ({"instance_count": 2, "instance_type": "ml.m5.xlarge"}, "--instance-count 2 needs GPU instances"),
    ({"spot": True, "max_run_hours": 10, "max_wait_hours": 5}, "--max-wait-hours (5.0) must be at least --max-run-hours"),
    ({"max_wait_hours": 50}, "--max-wait-hours applies to --spot jobs only"),
    ({"max_run_hours": 0}, "--max-run-hours must be positive"),
    ({"dry_run": False}, "--role is required"),
    ({"role": "arn:aws:iam::1234:role/SageMaker"}, "--role must be an IAM role ARN"),
    ({"role": "SageMakerRole"}, "--role must be an IAM role ARN"),
    ({"job_name": "my_job!"}, "--job-name"),
    ({"framework_version": "2.5.1"}, "--framework-version must be at least 2.6"),
    ({"train": None}, "--train is required"),
    ({"output_s3_uri": None}, "--output-s3-uri is required"),
])
def test_bad_options_are_refused_naming_the_option(overrides, fragment, tmp_path):
    values = {"train_config": "train.yaml", "train": "s3://speech-data/train", "output_s3_uri": "s3://speech-jobs/out",
              "dry_run": True, **overrides}
    with pytest.raises(UserError) as caught:
        build_config(SageMakerConfig, overrides=values)
    assert fragment in str(caught.value)


def test_valid_options_pass():
    config = build_config(SageMakerConfig, overrides={
        "train_config": "t.yaml", "train": "s3://speech-data", "output_s3_uri": "s3://my.bucket-1/a b/c",
        "role": "arn:aws:iam::123456789012:role/service-role/AmazonSageMaker-ExecutionRole-2024",
        "instance_type": "ml.p4d.24xlarge", "instance_count": 4, "spot": True, "max_wait_hours": 48})
    assert config.instance_count == 4


@pytest.mark.parametrize("yaml_values, overrides, fragment", [
    ("lora_r: [unclosed", {}, "invalid YAML at line 1"),
    ({"train_manifest": "train.jsonl", "lora_r": 0}, {}, "--train-config: --lora-r must be positive"),
    ({"train_manifest": "train.jsonl", "no_such_option": 1}, {}, "unknown option 'no_such_option'"),
    ({"dev_manifest": "dev.jsonl"}, {}, "--train-manifest is required"),
    ({"train_manifest": "/data/train.jsonl"}, {}, "train_manifest must be a path relative to the --train channel"),
    ({"train_manifest": "train.jsonl", "dev_manifest": "dev.jsonl"}, {}, "but --dev, the S3 folder it lies in"),
    ({"train_manifest": "train.jsonl"}, {"dev": "s3://speech-data/dev"}, "--dev is given but --train-config sets no dev_manifest"),
    ({"train_manifest": "train.jsonl", "model": "LOCAL"}, {}, "is a local folder, which the job cannot read"),
    ({"train_manifest": "train.jsonl", "wandb": True}, {}, "WANDB_API_KEY is not set"),
    ({"train_manifest": "train.jsonl"}, {"wandb_project": "asr"}, "--wandb-project/--wandb-entity need `wandb: true`"),
    ({"train_manifest": "train.jsonl", "augment": "AUGMENT"}, {}, "noise.dir must be a folder inside the container"),
])
def test_bad_train_yaml_is_refused_before_the_sdk_is_used(yaml_values, overrides, fragment, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    path = tmp_path / "train.yaml"
    if isinstance(yaml_values, str):
        path.write_text(yaml_values)
    else:
        values = {k: str(tmp_path) if v == "LOCAL" else v for k, v in yaml_values.items()}
        if values.get("augment") == "AUGMENT":
            values["augment"] = str(write_yaml(tmp_path / "aug.yaml", {"noise": {"p": 0.5, "dir": "noises/"}}))
        write_yaml(path, values)
    config = build_config(SageMakerConfig, overrides={"train_config": str(path), "train": "s3://speech-data/train",
                                                      "output_s3_uri": "s3://speech-jobs/out", "dry_run": True,
                                                      "region": "us-east-1", **overrides})
    with pytest.raises(UserError) as caught:
        stage.run(config)
    assert fragment in str(caught.value)


def test_cli_bad_s3_uri_is_one_line_exit_2(tmp_path):
    train_yaml = write_yaml(tmp_path / "train.yaml", {"train_manifest": "train.jsonl"})
    result = run_cli("sagemaker", "--train-config", str(train_yaml), "--train", "s3://x/train",
                     "--output-s3-uri", "s3://speech-jobs/out", "--dry-run")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "whisper-lora: error: --train 's3://x/train': bucket name 'x' must be 3 to 63 characters long"]


def test_entry_trains_exports_and_resumes_after_a_spot_restart(tiny_model_dir, tiny_corpus, tmp_path, capsys):
    """The container side, run for real: SM_* variables point at local folders standing in for the channels."""
    train_yaml = write_yaml(tmp_path / "train.yaml", {
        "train_manifest": "train.jsonl", "dev_manifest": "dev.jsonl", "model": str(tiny_model_dir),
        "batch_size": 2, "max_steps": 4, "eval_steps": 2, "lora_r": 4, "lora_alpha": 8, "max_new_tokens": 6,
        "eval_batch_size": 4, "logging_steps": 1, "output_dir": "ignored/in/the/job"})
    launcher_config = build_config(SageMakerConfig, overrides={
        "train_config": str(train_yaml), "train": "s3://speech-data/train", "dev": "s3://speech-data/dev",
        "output_s3_uri": "s3://speech-jobs/out", "dry_run": True})
    _, hyperparameters = stage.load_train_options(launcher_config)
    checkpoints, model_dir, output_data = tmp_path / "checkpoints", tmp_path / "model", tmp_path / "output-data"
    job_env = {"SM_HPS": json.dumps(hyperparameters), "SM_CHANNEL_TRAIN": str(tiny_corpus),
               "SM_CHANNEL_DEV": str(tiny_corpus), "SM_MODEL_DIR": str(model_dir),
               "SM_OUTPUT_DATA_DIR": str(output_data), "WHISPER_LORA_CHECKPOINT_DIR": str(checkpoints),
               "TRAINING_JOB_NAME": "zh-tiny-1"}

    # First start, in this process (the entry takes its environment as a mapping).
    summary = sagemaker_entry.run(job_env)
    assert summary["steps"] == 4
    assert "new run in" in capsys.readouterr().out
    assert (model_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((model_dir / "metrics.json").read_text())["steps"] == 4
    saved = yaml.safe_load((model_dir / "config.yaml").read_text())
    assert saved["train_manifest"] == str(tiny_corpus / "train.jsonl") and saved["output_dir"] == str(checkpoints)
    assert (output_data / "metrics.json").is_file() and (output_data / "tensorboard").is_dir()

    # A spot reclaim between the step-2 and step-4 checkpoints: SageMaker restores only what it had
    # synced from /opt/ml/checkpoints, and the restarted job starts with an empty model dir.
    for later in ("checkpoints/step-0000004", "last", "metrics.json"):
        path = checkpoints / later
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    shutil.rmtree(model_dir)
    # The restart runs as in the container: the generated train_entry.py, from the job's source_dir.
    source = tmp_path / "source"
    source.mkdir()
    stage.build_source_dir(source, [], {})
    second = subprocess.run([sys.executable, str(source / "train_entry.py")], cwd=source,
                            env=dict(os.environ, PYTHONUNBUFFERED="1", **job_env),
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    output = second.stdout + second.stderr
    assert "continuing the run in" in output and "resuming from" in output and "step 2/4" in output
    assert json.loads((model_dir / "metrics.json").read_text())["steps"] == 4
    assert (model_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_entry_outside_a_job_says_what_is_missing():
    with pytest.raises(UserError, match="SM_MODEL_DIR is not set"):
        sagemaker_entry.run({})
    with pytest.raises(UserError, match="dev_manifest 'dev.jsonl' is a path inside channel 'dev'"):
        sagemaker_entry.train_options({"SM_HPS": json.dumps({"train_manifest": "t.jsonl", "dev_manifest": "dev.jsonl"}),
                                       "SM_CHANNEL_TRAIN": "/opt/ml/input/data/train"})
