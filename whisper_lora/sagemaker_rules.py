"""A SageMaker training job's constants and the rules its options must follow, checked locally before
anything is sent to AWS.

The one place both sides read: `stages/sagemaker.py`, which builds and sends the request, and
`sagemaker_entry.py`, which runs inside the container; `SageMakerConfig.validate` applies the rules
without the config module importing a stage.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

from .errors import UserError
from .rundir import RESOLVED_CONFIG

if TYPE_CHECKING:
    from .config import SageMakerConfig

CHECKPOINT_DIR = "/opt/ml/checkpoints"  # SageMaker's default checkpoint_local_path
CHECKPOINT_DIR_ENV = "WHISPER_LORA_CHECKPOINT_DIR"
CODE_DIR_ENV = "WHISPER_LORA_CODE_DIR"  # set by the generated train_entry.py: where shipped files lie
# Channel name -> the train options that are paths inside that channel (FastFile mounts it at
# /opt/ml/input/data/<name>, announced as SM_CHANNEL_<NAME>).
CHANNEL_OPTIONS = {
    "train": ("train_manifest", "audio_dir", "feature_cache"),
    "dev": ("dev_manifest",),
    "retain": ("retain_manifest",),
    "model": ("model",),
}
SHIPPED_OPTIONS = ("augment",)  # files the launcher copies into source_dir, next to train_entry.py
# The job decides these: the run folder is the synced checkpoint folder and a restart must resume.
JOB_CONTROLLED_OPTIONS = ("output_dir", "resume", "overwrite")
# What goes into model.tar.gz (next to adapter/) and output.tar.gz, when the run wrote it.
MODEL_FILES = (RESOLVED_CONFIG, "metrics.json")
OUTPUT_DATA_FILES = (RESOLVED_CONFIG, "metrics.json", "skipped_samples.jsonl", "tensorboard")
MIN_TORCH = (2, 6)  # transformers 5 needs PyTorch >= 2.6; the AWS image's torch is used as is
SECONDS_PER_HOUR = 3600
MAX_RUN_SECONDS = 28 * 24 * SECONDS_PER_HOUR  # SageMaker's limit on MaxRuntimeInSeconds
MAX_VOLUME_GB = 16384  # SageMaker's limit on VolumeSizeInGB

_S3_URI = re.compile(r"^s3://([^/]*)(?:/(.*))?$", re.DOTALL)
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IP_ADDRESS = re.compile(r"^\d{1,3}(\.\d{1,3}){3}$")
_RESERVED_BUCKET_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_INSTANCE_TYPE = re.compile(r"^ml\.([a-z][a-z0-9-]*)\.(nano|micro|small|medium|large|metal|\d*xlarge)$")
_ROLE_ARN = re.compile(r"^arn:aws(-[a-z]+)*:iam::\d{12}:role/([\w+=,.@-]+/)*[\w+=,.@-]{1,64}$")
_JOB_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$")
_VERSION = re.compile(r"^(\d+)\.(\d+)(\.\d+)?$")
_PY_VERSION = re.compile(r"^py3\d+$")


def s3_uri_problem(uri: str) -> str | None:
    """Why `uri` is not `s3://bucket[/key]` with a valid bucket name, or None."""
    match = _S3_URI.match(uri)
    if not match:
        return "must look like s3://bucket/folder"
    bucket, key = match.group(1), match.group(2) or ""
    if not 3 <= len(bucket) <= 63:
        return f"bucket name {bucket!r} must be 3 to 63 characters long"
    if not _BUCKET.match(bucket):
        return (f"bucket name {bucket!r} may hold only lower-case letters, digits, dots and hyphens, "
                "and must begin and end with a letter or digit")
    if ".." in bucket or _IP_ADDRESS.match(bucket) or bucket.startswith(_RESERVED_BUCKET_PREFIXES):
        return f"bucket name {bucket!r} is not valid (two dots in a row, an IP address, or a reserved prefix)"
    if len(key.encode()) > 1024 or any(ord(c) < 32 for c in key):
        return "key must be at most 1024 bytes without control characters"
    return None


def is_gpu_instance(instance_type: str) -> bool:
    match = _INSTANCE_TYPE.match(instance_type)
    return bool(match) and match.group(1).startswith(("p", "g"))


def validate_options(config: SageMakerConfig) -> None:
    """Every check that needs neither the train YAML nor AWS; each error names its option."""
    for flag, value in (("--train-config", config.train_config), ("--train", config.train),
                        ("--output-s3-uri", config.output_s3_uri)):
        if not value:
            raise UserError(f"{flag} is required")
    for name in ("train", "dev", "retain", "base_model", "output_s3_uri", "checkpoint_s3_uri"):
        value = getattr(config, name)
        if value is not None and (problem := s3_uri_problem(value)):
            raise UserError(f"--{name.replace('_', '-')} {value!r}: {problem}")
    if not _INSTANCE_TYPE.match(config.instance_type):
        raise UserError(f"--instance-type must look like ml.<family>.<size> (e.g. ml.g5.2xlarge), "
                        f"got {config.instance_type!r}")
    if config.instance_count < 1:
        raise UserError(f"--instance-count must be at least 1, got {config.instance_count}")
    if config.instance_count > 1 and not is_gpu_instance(config.instance_type):
        raise UserError(f"--instance-count {config.instance_count} needs GPU instances (ml.g*/ml.p*): multi-node "
                        f"training runs torchrun, which SageMaker supports on GPUs; got {config.instance_type}")
    if not 1 <= config.volume_size_gb <= MAX_VOLUME_GB:
        raise UserError(f"--volume-size-gb must lie in [1, {MAX_VOLUME_GB}], got {config.volume_size_gb}")
    if not 0 < config.max_run_hours * SECONDS_PER_HOUR <= MAX_RUN_SECONDS:
        raise UserError(f"--max-run-hours must be positive and at most {MAX_RUN_SECONDS // SECONDS_PER_HOUR} "
                        f"(28 days), got {config.max_run_hours}")
    if config.max_wait_hours is not None:
        if not config.spot:
            raise UserError("--max-wait-hours applies to --spot jobs only (the time spent waiting for spot capacity)")
        if config.max_wait_hours < config.max_run_hours:
            raise UserError(f"--max-wait-hours ({config.max_wait_hours}) must be at least --max-run-hours "
                            f"({config.max_run_hours}): it counts the training time plus the waits for capacity")
    if config.role is not None and not _ROLE_ARN.match(config.role):
        raise UserError(f"--role must be an IAM role ARN like arn:aws:iam::123456789012:role/NAME, got {config.role!r}")
    if config.role is None and not config.dry_run:
        raise UserError("--role is required (the IAM role the job runs as; --dry-run works without it)")
    if config.job_name is not None and not _JOB_NAME.match(config.job_name):
        raise UserError(f"--job-name must be 1 to 63 letters, digits and hyphens, starting with a letter or "
                        f"digit, got {config.job_name!r}")
    if config.region is not None and not _REGION.match(config.region):
        raise UserError(f"--region must be an AWS region like us-east-1, got {config.region!r}")
    if config.image_uri is None:
        version = _VERSION.match(config.framework_version)
        if not version:
            raise UserError(f"--framework-version must look like 2.6.0, got {config.framework_version!r}")
        if (int(version.group(1)), int(version.group(2))) < MIN_TORCH:
            raise UserError(f"--framework-version must be at least {'.'.join(map(str, MIN_TORCH))} "
                            f"(transformers 5 needs it), got {config.framework_version}")
        if not _PY_VERSION.match(config.py_version):
            raise UserError(f"--py-version must look like py312, got {config.py_version!r}")
