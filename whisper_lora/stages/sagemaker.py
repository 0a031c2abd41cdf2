"""`whisper-lora sagemaker`: run `whisper-lora train` as an Amazon SageMaker training job.

Why it is built this way:

* The job is made by the SageMaker SDK's own `PyTorch` estimator, not by hand, so the request is
  whatever AWS's SDK builds (hyperparameter encoding, torchrun flags, image URI). `--dry-run` runs that
  same path with botocore hooks that answer every AWS call locally and record the CreateTrainingJob
  request instead of sending it: the printed JSON is exactly what a real run sends, and no credentials
  or network are needed.
* The code that runs in the container is the whisper_lora package this command runs from, copied into
  the job's source_dir (local changes included) with a requirements.txt of its declared dependencies.
  No wheel build, no PyPI release; the AWS image's CUDA PyTorch already satisfies `torch>=2.1`, so pip
  leaves it alone.
* Everything that can be checked locally is, before the SDK is even imported: the train YAML (parsed
  and validated as `TrainConfig`), S3 URIs, instance type, role, spot limits, which option lies in
  which channel. A wrong option costs a second, not an instance start-up.
* Data stays in S3: channels are FastFile mounts, read lazily, so a large corpus needs neither a
  download before training nor disk for a copy.
* Checkpoints go to /opt/ml/checkpoints, which SageMaker syncs to `--checkpoint-s3-uri`; after a spot
  interruption the job restarts with that folder restored and sagemaker_entry.py resumes.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

from ..config import SageMakerConfig, TrainConfig, build_config
from ..errors import UserError
from ..sagemaker_rules import (CHANNEL_OPTIONS, CHECKPOINT_DIR, CODE_DIR_ENV, JOB_CONTROLLED_OPTIONS, SECONDS_PER_HOUR,
                               SHIPPED_OPTIONS, is_gpu_instance)

INSTALL_HINT = "pip install 'whisper-lora[sagemaker]'"
ENTRY_SCRIPT = "train_entry.py"  # at the root of source_dir; torchrun runs it once per GPU
DISTRIBUTION = {"torch_distributed": {"enabled": True}}  # torchrun on every node, DDP across all GPUs
DRY_RUN_ROLE = "arn:aws:iam::000000000000:role/dry-run-placeholder"
DRY_RUN_ACCOUNT = "000000000000"
MASK = "<masked>"
SECRET_ENV = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.IGNORECASE)
# Passed from the caller's environment when the train YAML turns W&B on, never otherwise.
WANDB_ENV = ("WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_GROUP", "WANDB_MODE", "WANDB_BASE_URL",
             "WANDB_TAGS", "WANDB_NOTES")
# CloudWatch metric from train.py's "step N: dev CER 12.34%" line (in percent).
METRIC_DEFINITIONS = [{"Name": "dev:error_rate_percent", "Regex": r"step \d+: dev (?:CER|WER) ([0-9.]+)%"}]
CHANNEL_FLAGS = {"train": "--train", "dev": "--dev", "retain": "--retain", "model": "--base-model"}

# ---- the train YAML -------------------------------------------------------------------------------

def load_train_options(config: SageMakerConfig) -> tuple[TrainConfig, dict]:
    """The train YAML, validated as TrainConfig, and the options it sets (the job's hyperparameters)."""
    try:
        train_config = build_config(TrainConfig, config.train_config, check_inputs=False)  # paths are inside channels
    except UserError as exc:
        raise UserError(f"--train-config: {exc}") from None
    raw = yaml.safe_load(Path(config.train_config).read_text()) or {}
    names = [str(key).replace("-", "_") for key in raw]
    ignored = [name for name in names if name in JOB_CONTROLLED_OPTIONS]
    if ignored:
        print(f"whisper-lora sagemaker: note: {', '.join(ignored)} from --train-config ignored: the job trains in "
              f"{CHECKPOINT_DIR}, resumes from it by itself and exports to its model.tar.gz", file=sys.stderr)
    options = {name: getattr(train_config, name) for name in names
               if name not in JOB_CONTROLLED_OPTIONS and getattr(train_config, name) is not None}
    return train_config, options


def check_channels(config: SageMakerConfig, train_config: TrainConfig) -> None:
    """Each path option of the YAML lies inside a channel that is given, and each channel is used."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    channels = {"train": config.train, "dev": config.dev, "retain": config.retain, "model": config.base_model}
    for channel, names in CHANNEL_OPTIONS.items():
        flag = CHANNEL_FLAGS[channel]
        for name in names:
            if name not in known:
                if channels[channel]:
                    raise UserError(f"{flag} needs the train option {name}, which this whisper-lora does not have")
                continue
            value = getattr(train_config, name)
            if value is None:
                continue
            if channel == "model" and not channels["model"]:
                if Path(value).expanduser().exists():
                    raise UserError(f"--train-config: model {value!r} is a local folder, which the job cannot "
                                    "read; upload it and pass --base-model s3://..., or name a hub id")
                continue
            if Path(value).is_absolute() or value.startswith("s3://"):
                raise UserError(f"--train-config: {name} must be a path relative to the {flag} channel, got {value!r}")
            if not channels[channel]:
                raise UserError(f"--train-config sets {name} ({value!r}, a path inside a channel) but {flag}, "
                                "the S3 folder it lies in, is not given")
        first = names[0]
        if channels[channel] and channel in ("dev", "retain") and getattr(train_config, first, None) is None:
            raise UserError(f"{flag} is given but --train-config sets no {first} (a path inside that channel)")


def shipped_files(train_config: TrainConfig) -> dict[str, Path]:
    """Files named in the YAML that go into source_dir: their name there -> the local file."""
    shipped = {}
    for name in SHIPPED_OPTIONS:
        value = getattr(train_config, name, None)
        if value is None:
            continue
        path = Path(value)
        if not path.is_file():
            raise UserError(f"--train-config: {name} file not found", path)
        if name == "augment":
            spec = yaml.safe_load(path.read_text()) or {}
            noise = spec.get("noise") if isinstance(spec, dict) else None
            if isinstance(noise, dict) and noise.get("dir") and not Path(noise["dir"]).is_absolute():
                raise UserError("noise.dir must be a folder inside the container, e.g. "
                                "/opt/ml/input/data/train/noises (put the noises in the --train channel)", path)
        shipped[f"{name}{path.suffix}"] = path
    return shipped


def job_environment(config: SageMakerConfig, train_config: TrainConfig, job_name: str) -> dict[str, str]:
    """The container's environment: W&B settings from here (only when the YAML turns W&B on)."""
    environment = {"PYTHONUNBUFFERED": "1"}  # log lines reach CloudWatch as they are written
    wandb = getattr(train_config, "wandb", False)
    if not wandb:
        if config.wandb_project or config.wandb_entity:
            raise UserError("--wandb-project/--wandb-entity need `wandb: true` in --train-config")
        return environment
    environment.update({name: os.environ[name] for name in WANDB_ENV if os.environ.get(name)})
    if not environment.get("WANDB_API_KEY") and environment.get("WANDB_MODE") not in ("offline", "disabled"):
        raise UserError("--train-config turns on W&B but WANDB_API_KEY is not set in this environment, where the "
                        "job takes it from (or set WANDB_MODE=offline)")
    if config.wandb_project:
        environment["WANDB_PROJECT"] = config.wandb_project
    if config.wandb_entity:
        environment["WANDB_ENTITY"] = config.wandb_entity
    environment.setdefault("WANDB_RUN_GROUP", job_name)
    # A spot restart is the same job: it continues the same W&B run instead of starting a second one.
    environment.update({"WANDB_RUN_ID": job_name, "WANDB_RESUME": "allow"})
    return environment


def requirements(extras: set[str]) -> list[str]:
    """whisper-lora's declared dependencies (with `extras`), for pip in the container."""
    import importlib.metadata

    from packaging.requirements import Requirement

    try:
        declared = importlib.metadata.requires("whisper-lora") or []
    except importlib.metadata.PackageNotFoundError:
        raise UserError("whisper-lora is not installed (its dependencies are read from the installed package); "
                        "pip install -e . first") from None
    lines, provided = [], set()
    for text in declared:
        requirement = Requirement(text)
        if requirement.marker is None or "extra" not in str(requirement.marker):
            lines.append(text)  # other markers (python_version, ...) are for pip in the container to evaluate
            continue
        wanted = [extra for extra in extras if requirement.marker.evaluate({"extra": extra})]
        if wanted:
            provided.update(wanted)
            lines.append(f"{requirement.name}{requirement.specifier}")
    lines += sorted(extra for extra in extras - provided)  # an extra of one package named like it (wandb)
    return lines


def build_source_dir(folder: Path, requirement_lines: list[str], shipped: dict[str, Path]) -> None:
    """The job's code: this whisper_lora package, a requirements.txt, the entry script, shipped files."""
    package = Path(__file__).resolve().parents[1]
    shutil.copytree(package, folder / package.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (folder / "requirements.txt").write_text("".join(line + "\n" for line in requirement_lines))
    (folder / ENTRY_SCRIPT).write_text(
        '"""Generated by `whisper-lora sagemaker`: the training job\'s entry point (torchrun runs it per GPU)."""\n'
        "import os\nimport sys\nfrom pathlib import Path\n\n"
        f"os.environ.setdefault({CODE_DIR_ENV!r}, str(Path(__file__).resolve().parent))\n"
        "from whisper_lora.sagemaker_entry import main  # noqa: E402\n\n"
        "sys.exit(main())\n")
    for name, path in shipped.items():
        shutil.copy(path, folder / name)


# ---- AWS -----------------------------------------------------------------------------------------

def _warnings_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


def import_sdk():
    os.environ.setdefault("SAGEMAKER_SUPPRESS_V2_WARNING", "1")  # we use the v2 estimator API on purpose
    # The SDK logs where it looked for its defaults files at import time: keep that out of our output.
    config_logger = logging.getLogger("sagemaker.config")
    if _warnings_only not in config_logger.filters:
        config_logger.addFilter(_warnings_only)
    try:
        import boto3
        import sagemaker
        from sagemaker.inputs import TrainingInput
        from sagemaker.pytorch import PyTorch  # gone in SDK v3, hence the version in the hint
    except ImportError:
        raise UserError(f"`whisper-lora sagemaker` needs the SageMaker SDK v2 (sagemaker<3): {INSTALL_HINT}") from None
    logging.getLogger("sagemaker").setLevel(logging.WARNING)
    return boto3, sagemaker, PyTorch, TrainingInput


class DryRun:
    """botocore hooks that answer every AWS call locally and keep what would have been sent."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def install(self, boto_session) -> None:
        boto_session.events.register("provide-client-params", self._record)
        boto_session.events.register("before-call", self._answer)

    def _record(self, params: dict, model, **_) -> None:
        self.calls.append((f"{model.service_model.service_name}:{model.name}", params))

    @staticmethod
    def _answer(model, **_):
        from botocore.awsrequest import AWSResponse

        parsed = {"CreateTrainingJob": {"TrainingJobArn": "arn:aws:sagemaker:dry-run"},
                  "CreateMultipartUpload": {"UploadId": "dry-run"}, "UploadPart": {"ETag": '"dry-run"'},
                  "GetCallerIdentity": {"Account": DRY_RUN_ACCOUNT}}.get(model.name, {})
        return AWSResponse("https://dry-run.invalid", 200, {}, None), parsed

    def request(self, operation: str) -> dict:
        found = [params for name, params in self.calls if name.endswith(":" + operation)]
        if not found:
            raise RuntimeError(f"the SageMaker SDK made no {operation} call")
        return found[-1]


def masked(request: dict) -> dict:
    """The request with secret-looking environment values hidden, for printing."""
    shown = json.loads(json.dumps(request, default=str))
    environment = shown.get("Environment") or {}
    for name in environment:
        if SECRET_ENV.search(name):
            environment[name] = MASK
    return shown


def default_region(boto3) -> str:
    region = boto3.Session().region_name
    if not region:
        raise UserError("--region is required (or set AWS_REGION / AWS_DEFAULT_REGION)")
    return region


def training_image(sagemaker, config: SageMakerConfig, region: str) -> str:
    if config.image_uri:
        return config.image_uri
    try:
        return sagemaker.image_uris.retrieve("pytorch", region, version=config.framework_version,
                                             py_version=config.py_version, instance_type=config.instance_type,
                                             image_scope="training")
    except ValueError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"no AWS PyTorch training image for --framework-version {config.framework_version} "
                        f"--py-version {config.py_version} --instance-type {config.instance_type} in {region} "
                        f"({first}); choose others or pass --image-uri") from None


def run(config: SageMakerConfig) -> int:
    # ---- local checks: the train YAML first, then how its paths map onto channels ----------------
    train_config, hyperparameters = load_train_options(config)
    check_channels(config, train_config)
    shipped = shipped_files(train_config)
    for shipped_name in shipped:  # the container resolves them against its code folder
        hyperparameters[Path(shipped_name).stem] = shipped_name
    if config.wandb_project:
        hyperparameters["wandb_project"] = config.wandb_project  # the flag wins over the YAML, as elsewhere
    if config.spot and train_config.save_steps is None:
        print("whisper-lora sagemaker: note: --spot without save_steps in --train-config: checkpoints are written "
              "only at each evaluation, and an interruption loses the work done since", file=sys.stderr)
    job_name = config.job_name or time.strftime("whisper-lora-%Y%m%d-%H%M%S", time.gmtime())
    environment = job_environment(config, train_config, job_name)
    checkpoint_s3_uri = config.checkpoint_s3_uri or f"{config.output_s3_uri.rstrip('/')}/{job_name}/checkpoints"
    extras = {"wandb"} if getattr(train_config, "wandb", False) else set()
    requirement_lines = requirements(extras)

    # ---- the SDK builds the job ------------------------------------------------------------------
    boto3, sagemaker, PyTorch, TrainingInput = import_sdk()
    region = config.region or default_region(boto3)
    image = training_image(sagemaker, config, region)
    dry_run = DryRun() if config.dry_run else None
    if dry_run is not None:
        # Static placeholder credentials: nothing looks for real ones (no profile, no instance metadata).
        boto_session = boto3.Session(region_name=region, aws_access_key_id="dry-run", aws_secret_access_key="dry-run")
        dry_run.install(boto_session)
        sdk_defaults = dry_run_sdk_defaults()
    else:
        boto_session, sdk_defaults = boto3.Session(region_name=region), None
    session = sagemaker.Session(boto_session=boto_session, sagemaker_config=sdk_defaults)
    channels = {"train": config.train, "dev": config.dev, "retain": config.retain, "model": config.base_model}
    inputs = {name: TrainingInput(s3_data=uri, input_mode="FastFile") for name, uri in channels.items() if uri}
    max_run = int(config.max_run_hours * SECONDS_PER_HOUR)
    max_wait = int((config.max_wait_hours or 2 * config.max_run_hours) * SECONDS_PER_HOUR) if config.spot else None

    with tempfile.TemporaryDirectory(prefix="whisper-lora-sagemaker-") as folder:
        source_dir = Path(folder)
        build_source_dir(source_dir, requirement_lines, shipped)
        try:
            estimator = PyTorch(
                entry_point=ENTRY_SCRIPT, source_dir=str(source_dir), role=config.role or DRY_RUN_ROLE,
                image_uri=image, framework_version=config.framework_version, py_version=config.py_version,
                instance_type=config.instance_type, instance_count=config.instance_count, input_mode="FastFile",
                volume_size=config.volume_size_gb, max_run=max_run, use_spot_instances=config.spot,
                max_wait=max_wait, checkpoint_s3_uri=checkpoint_s3_uri, checkpoint_local_path=CHECKPOINT_DIR,
                output_path=config.output_s3_uri, code_location=config.output_s3_uri,
                hyperparameters=hyperparameters, environment=environment,
                distribution=DISTRIBUTION if is_gpu_instance(config.instance_type) else None,
                metric_definitions=METRIC_DEFINITIONS, sagemaker_session=session,
                debugger_hook_config=False, disable_profiler=True)  # smdebug hooks would wrap our model
            estimator.fit(inputs, job_name=job_name, wait=config.wait and dry_run is None,
                          logs="All" if config.wait else "None")
        except ValueError as exc:  # the SDK's own checks of our arguments
            raise UserError(f"SageMaker SDK: {str(exc).strip().splitlines()[0]}") from None
        except Exception as exc:
            aws_error(exc)
            raise

    if dry_run is not None:
        print(json.dumps(masked(dry_run.request("CreateTrainingJob")), indent=2, ensure_ascii=False))
        uploads = [f"s3://{p['Bucket']}/{p['Key']}" for name, p in dry_run.calls
                   if name in ("s3:PutObject", "s3:CreateMultipartUpload")]
        code = [ENTRY_SCRIPT, f"requirements.txt ({len(requirement_lines)} requirements)", "whisper_lora/", *shipped]
        print(f"whisper-lora sagemaker: dry run, no AWS call made; the job's code ({', '.join(code)}) would be "
              f"uploaded to {', '.join(uploads) or '(nowhere)'}", file=sys.stderr)
        if not config.role:
            print("whisper-lora sagemaker: no --role given: the request shows a placeholder role", file=sys.stderr)
        return 0
    print(f"started training job {job_name} in {region}\n"
          f"  console:     https://{region}.console.aws.amazon.com/sagemaker/home?region={region}#/jobs/{job_name}\n"
          f"  model:       {config.output_s3_uri.rstrip('/')}/{job_name}/output/model.tar.gz\n"
          f"  checkpoints: {checkpoint_s3_uri}")
    return 0


def dry_run_sdk_defaults() -> dict:
    """The user's SageMaker SDK defaults files (they shape the request), with telemetry off: no network."""
    from sagemaker.config import load_sagemaker_config

    try:
        defaults = load_sagemaker_config()
    except Exception as exc:  # e.g. defaults kept in S3, which a dry run cannot read
        print(f"whisper-lora sagemaker: note: SDK defaults not applied in the dry run ({exc})", file=sys.stderr)
        defaults = {}
    defaults.setdefault("SchemaVersion", "1.0")
    modules = defaults.setdefault("SageMaker", {}).setdefault("PythonSDK", {}).setdefault("Modules", {})
    modules["TelemetryOptOut"] = True
    return defaults


def aws_error(exc: Exception) -> None:
    """Credentials and AWS refusals become one-line errors; anything else keeps its traceback."""
    import botocore.exceptions

    if isinstance(exc, (botocore.exceptions.NoCredentialsError, botocore.exceptions.PartialCredentialsError)):
        raise UserError("no AWS credentials found (aws configure, AWS_PROFILE, or an instance role); "
                        "--dry-run needs none") from None
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        raise UserError(f"AWS refused {exc.operation_name}: {error.get('Code')}: {error.get('Message')}") from None
    if isinstance(exc, botocore.exceptions.BotoCoreError):
        raise UserError(f"AWS: {exc}") from None
