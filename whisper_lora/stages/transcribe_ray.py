"""`whisper-lora transcribe --ray`: the same transcription as a Ray Data job, for corpora past one process.

A flag on `transcribe` rather than a command of its own: the decoding options, models and inputs are
transcribe's, and only where it runs and what it writes (shards that resume) change. Reads top to bottom:
rows from the inputs, minus the rows the output folder already holds -> Ray -> an actor pool of
`batch.Transcriber` -> shards -> a summary.
"""
from __future__ import annotations

import json
import os
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

from ..batch import (BASE, SHARD_PREFIX, Transcriber, TranscriberSpec, filesystem, list_rows, pending_rows,
                     read_shards, summarise)
from ..config import TranscribeConfig
from ..errors import UserError
from ..manifest import language_code
from ..models import resolve_model
from ..rundir import save_config
from .transcribe import decode_options

RAY_HINT = "--ray needs Ray Data: pip install 'whisper-lora[ray]'"
RAY_CONFIG = "transcribe_config.yaml"


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UserError(RAY_HINT) from None
    return ray


def pool_models(config: TranscribeConfig) -> tuple[str | None, str | None, str]:
    """(base for the pool, adapters folder, model of rows that name none). An adapter folder as --model is
    served as its folder's name beside its base, as `serve --adapters` would."""
    if config.model and config.backend == "transformers":
        resolved = resolve_model(config.model)
        if resolved.adapter is not None:
            if config.adapters and Path(config.adapters).resolve() != resolved.adapter.parent:
                raise UserError("--model is an adapter outside --adapters: put it there, or give its base as --model")
            base = json.loads((resolved.adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
            return base, str(resolved.adapter.parent), resolved.adapter.name
    return config.model, config.adapters, BASE


class ShardNames:
    """Shard file names unique to this run (a re-run never overwrites one) and the same for a retried write
    task (a retry replaces its own file: no row twice). Ray calls it in the write tasks: it is pickled.
    Ray's Parquet writer insists on the write's id in the name, so both formats carry it."""

    def __init__(self, run_id: str, extension: str):
        self.run_id, self.extension = run_id, extension

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"{SHARD_PREFIX}{self.run_id}-{write_uuid}-{task_index:06d}.{self.extension}"


# A Ray this command starts for itself shares the machine with the job, and on two cores its daemons' periodic
# work took ~10% of the CPU (docs/scale.md): their sampling, metrics, usage report and pre-started idle workers
# are turned down here, for that Ray only. A cluster joined with --ray-address / RAY_ADDRESS keeps its operator's
# settings. Read by Ray's daemons when they start, hence environment variables set before ray.init; a value
# already in the environment wins.
QUIET_LOCAL_RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",  # no report home (hourly, and once a minute in)
    "REPORTER_UPDATE_INTERVAL_MS": "60000",  # the dashboard agent samples every process (psutil) every 5 s
    "AUTOSCALER_UPDATE_INTERVAL_S": "30",  # one node: nothing for the autoscaler monitor to add
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0",  # the log monitor lists the log folder 10 times a second,
    "LOG_NAME_UPDATE_INTERVAL_S": "5",  # log_to_driver being off; every 5 s is plenty
}
QUIET_LOCAL_RAY_CONFIG = {
    "enable_metrics_collection": False,  # Prometheus metrics nobody scrapes (no dashboard)
    "prestart_worker_first_driver": False,  # a worker per CPU started idle at once; actors start their own
    "task_events_report_interval_ms": 0,  # task events for `ray list tasks` / the timeline, flushed every second
}


def connect(ray, address: str | None):
    """This machine's Ray (or the cluster `address` names, or RAY_ADDRESS's), quiet unless something fails."""
    import logging

    if ray.is_initialized():  # a caller's own session (a notebook, a test's cluster)
        return
    kwargs = {"address": address} if address else {}
    if not address and not os.environ.get("RAY_ADDRESS"):
        for name, value in QUIET_LOCAL_RAY_ENV.items():
            os.environ.setdefault(name, value)
        # Ray reads RAY_<key> too, but _system_config would win over it
        kwargs["_system_config"] = {key: value for key, value in QUIET_LOCAL_RAY_CONFIG.items()
                                    if f"RAY_{key}" not in os.environ}
    ray.init(**kwargs, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
             configure_logging=True)


def quiet_data_context(ray) -> None:
    """Ray Data's per-job background work that costs CPU on a small machine: a thread in every actor call reading
    the process's memory map once a second (USS, for a statistic), and a progress bar per operator redrawn
    beside the job's own (rows, resources), which stays."""
    context = ray.data.DataContext.get_current()
    context.memory_usage_poll_interval_s = None
    context.enable_operator_progress_bars = False


def run(config: TranscribeConfig) -> int:
    ray = import_ray()
    from ray.data import ActorPoolStrategy

    # ---- set up: the rows, what is already written, the cluster
    base, adapters, default_model = pool_models(config)
    language = language_code(config.language, "--language") if config.language else None
    rows = list_rows(config.inputs, default_model, language)
    fmt = "parquet" if config.output_format == "parquet" else "jsonl"
    out_fs, out_root = filesystem(config.output_dir)
    if not config.output_dir.startswith("s3://"):  # S3 has no folders (and prefix-scoped keys may not list parents)
        out_fs.create_dir(out_root, recursive=True)
    done, notes = read_shards(config.output_dir)
    for note in notes:
        print(f"whisper-lora: note: {note}", file=sys.stderr)
    todo = pending_rows(rows, done)
    if not config.output_dir.count("://"):
        save_config(config, Path(config.output_dir) / RAY_CONFIG)
    print(f"{len(rows)} files: {len(rows) - len(todo)} already in {config.output_dir}, {len(todo)} to transcribe",
          file=sys.stderr)
    started = time.monotonic()
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    if todo:
        connect(ray, config.ray_address)
        quiet_data_context(ray)
        resources = ray.cluster_resources()
        per_worker = config.gpus_per_worker or config.cpus_per_worker
        available = resources.get("GPU" if config.gpus_per_worker else "CPU", 0)
        if available < per_worker:  # an actor Ray could never place: the job would wait for ever
            raise UserError(f"the Ray cluster has {available:g} {'GPU' if config.gpus_per_worker else 'CPU'}s; "
                            f"a worker asks for {per_worker:g} (--gpus-per-worker / --cpus-per-worker)")
        workers = config.num_workers or max(1, int(available // per_worker))
        workers = min(workers, -(-len(todo) // config.rows_per_call))  # no actor without rows to load a model for
        # shards carry segment times whatever the format: timestamps on, as `transcribe --output-format jsonl`
        options = replace(decode_options(config), without_timestamps=False)
        spec = TranscriberSpec(base, adapters, config.backend, config.compute_type, config.device, config.dtype,
                               options, config.vad, threads=max(1, int(config.cpus_per_worker)))

        # ---- the job: rows -> actors -> shards, streamed (Ray Data shows its progress bars)
        dataset = ray.data.from_items(todo, override_num_blocks=max(1, -(-len(todo) // config.rows_per_call)))
        transcribed = dataset.map_batches(
            Transcriber, fn_constructor_args=(spec,), batch_size=config.rows_per_call, batch_format="pyarrow",
            # One call in flight per actor: Ray Data's default queues a second behind the running one, so
            # the blocks are bound to actors ahead of time and the job ends with one actor still working through
            # its queue while the other idles (60 files, 2 x 1: 1.10-1.19x one process against 1.21-1.27x).
            # The next call now goes to whichever actor is free.
            compute=ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1), num_cpus=config.cpus_per_worker,
            num_gpus=config.gpus_per_worker or None)
        write = transcribed.write_parquet if fmt == "parquet" else transcribed.write_json
        # writing is I/O: a write task that reserved a CPU would wait behind the actors holding them all
        write(out_root, filesystem=out_fs, filename_provider=ShardNames(run_id, fmt), ray_remote_args={"num_cpus": 0})

    # ---- summary: this run's rows (their speed; only its own shards are read again), and every failed row
    # of the job (the exit status)
    new, _ = read_shards(config.output_dir, set_aside=False, prefix=f"{SHARD_PREFIX}{run_id}-") if todo else ([], [])
    asked = {(r["path"], r["model"]) for r in rows}
    summary = summarise(new, time.monotonic() - started, skipped=len(rows) - len(todo))
    failed = [r for r in done + new if r.get("error") and (r.get("path"), r.get("model")) in asked]
    for row in failed:
        print(f"whisper-lora: error: {row['error']}", file=sys.stderr)
    print(summary.line() + (f"; {len(failed)} rows of the job have errors" if failed else ""), file=sys.stderr)
    return 1 if failed else 0
