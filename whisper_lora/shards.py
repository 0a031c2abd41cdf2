"""Sharded training data for corpora larger than memory: WebDataset-style tar shards, streamed.

`write_shards` (used by `whisper-lora prepare --shards`) decodes every sample once to 16 kHz mono
FLAC and packs it with its metadata into tar files of `shard_size` samples:

  shard-00000.tar   000000.flac 000000.json 000001.flac 000001.json …
  shards.json       {"format": "whisper-lora-shards", "version": 1, "shards": [{"file", "samples"}], …}

The member naming is WebDataset's (key.extension), so `webdataset` and `tar` read them too.

`ShardStream` is the iterable the trainer reads. Its guarantees:
* every (rank, DataLoader worker) reads a disjoint set of shards, reshuffled per epoch;
* samples are shuffled with a buffer (`shuffle_buffer` deep), seeded by (seed, epoch, rank, worker);
* the order is decided from metadata alone and decoding happens after the buffer, so a resumed run
  can skip what it already consumed without decoding it: after SIGKILL and `--resume`, no sample of
  the epoch is seen twice and none is skipped;
* a truncated or corrupt shard yields an error record naming the shard and member; the rest of the
  shard is skipped and reported, training goes on.
"""
from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .audio import load_window
from .constants import SAMPLE_RATE
from .errors import AudioError, UserError
from .manifest import Sample, TimedText

INDEX_FILE = "shards.json"
FORMAT = "whisper-lora-shards"
VERSION = 1


def is_shard_dir(path: str | Path | None) -> bool:
    return path is not None and (Path(path) / INDEX_FILE).is_file()


def _meta(sample: Sample, seconds: float) -> dict:
    meta = {"id": sample.id, "text": sample.text, "duration": round(seconds, 3), "source": sample.source}
    if sample.language:
        meta["language"] = sample.language
    if sample.sentences:
        meta["sentences"] = [{"start": s.start, "end": s.end, "text": s.text} for s in sample.sentences]
    return meta


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write_shards(samples: list[Sample], folder: str | Path, shard_size: int = 1000,
                 progress: bool = True) -> tuple[dict, list[tuple[str, str]]]:
    """Decode and pack `samples` into tar shards; returns the index and (source, reason) per rejected row."""
    import soundfile as sf
    from tqdm.auto import tqdm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards, rejected, tar, count, key = [], [], None, 0, 0

    def close() -> None:
        nonlocal tar
        if tar is not None:
            tar.close()
            partial = folder / (shards[-1]["file"] + ".partial")
            partial.replace(folder / shards[-1]["file"])  # a shard appears only once complete
            tar = None

    for sample in tqdm(samples, desc="write shards", unit="clip", disable=not progress):
        try:
            audio = load_window(sample.audio_path, sample.start, sample.end)
        except AudioError as exc:
            rejected.append((sample.source, str(exc)))
            continue
        if tar is None or count == shard_size:
            close()
            shards.append({"file": f"shard-{len(shards):05d}.tar", "samples": 0})
            tar = tarfile.open(folder / (shards[-1]["file"] + ".partial"), "w")
            count = 0
        flac = io.BytesIO()
        sf.write(flac, audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        name = f"{key:06d}"
        _add_member(tar, f"{name}.json", json.dumps(_meta(sample, len(audio) / SAMPLE_RATE), ensure_ascii=False).encode())
        _add_member(tar, f"{name}.flac", flac.getvalue())
        shards[-1]["samples"] += 1
        count, key = count + 1, key + 1
    close()
    index = {"format": FORMAT, "version": VERSION, "samples": key, "shards": shards}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=1))
    return index, rejected


def read_index(folder: str | Path) -> dict:
    folder = Path(folder)
    try:
        index = json.loads((folder / INDEX_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {INDEX_FILE} ({exc})", folder) from None
    if index.get("format") != FORMAT or not index.get("shards"):
        raise UserError(f"{INDEX_FILE} is not a whisper-lora shard index (or lists no shards)", folder)
    for shard in index["shards"]:
        if not (folder / shard["file"]).is_file():
            raise UserError(f"shard listed in {INDEX_FILE} is missing", folder / shard["file"])
    return index


@dataclass
class ShardRecord:
    """One sample as read from a shard, before decoding."""
    key: str
    meta: dict | None
    flac: bytes | None
    error: str | None = None


def iter_shard(path: Path) -> Iterator[ShardRecord]:
    """Records of one shard in order; a truncated or corrupt tail becomes one error record."""
    pending: dict[str, dict] = {}
    member_number = 0
    try:
        with tarfile.open(path, "r") as tar:
            for member in tar:
                member_number += 1
                key, _, extension = member.name.rpartition(".")
                payload = tar.extractfile(member).read() if member.isfile() else b""
                if member.isfile() and len(payload) != member.size:
                    raise tarfile.ReadError("unexpected end of data")
                pending.setdefault(key, {})[extension] = payload
                record = pending[key]
                if "json" in record and "flac" in record:
                    del pending[key]
                    try:
                        meta = json.loads(record["json"])
                    except json.JSONDecodeError:
                        yield ShardRecord(key, None, None, f"{path}: member {key}.json is not valid JSON")
                        continue
                    yield ShardRecord(key, meta, record["flac"])
    except (tarfile.TarError, EOFError, OSError) as exc:
        yield ShardRecord(f"{path.name}#{member_number}", None, None,
                          f"{path}: shard is truncated or corrupt after member {member_number} ({exc}); "
                          "the rest of this shard is skipped")
        return  # a half-read pair belongs to the skipped rest, not a second problem
    for key in pending:
        yield ShardRecord(key, None, None, f"{path}: sample {key} lacks its .json or .flac member")


def sample_from_meta(meta: dict, shard: Path) -> Sample:
    """The shard row as a Sample whose `id` is the original sample's (its audio path and span), so
    logs, augmentation and resume speak of the same sample whether it came from a shard or not."""
    sentences = tuple(TimedText(float(s["start"]), float(s["end"]), str(s["text"])) for s in meta.get("sentences", ()))
    return Sample(audio_path=Path(meta.get("id") or shard), text=meta.get("text", ""), language=meta.get("language"),
                  duration=meta.get("duration"), sentences=sentences, source=meta.get("source", str(shard)))


def _rng(*seed: int) -> np.random.Generator:
    return np.random.default_rng([int(s) for s in seed])


class ShardStream(torch.utils.data.IterableDataset):
    """Streams one epoch of this rank's shards; `make_item(record, epoch)` turns a record into a model input.

    Set `epoch` and `skip` (per DataLoader worker: records already consumed in this epoch) before
    creating each DataLoader iterator; workers receive a copy of this object with those values.
    """

    def __init__(self, folder: str | Path, make_item, seed: int = 0, shuffle_buffer: int = 1000,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0):
        self.folder = Path(folder)
        self.index = read_index(self.folder)
        readers = world_size * max(1, num_workers)
        if len(self.index["shards"]) < readers:
            raise UserError(f"{len(self.index['shards'])} shards cannot give each of {world_size} processes x "
                            f"{max(1, num_workers)} loader workers its own shard; write more, smaller shards "
                            "(prepare --shard-size) or use fewer --num-workers", self.folder)
        self.make_item, self.seed, self.shuffle_buffer = make_item, seed, shuffle_buffer
        self.rank, self.world_size = rank, world_size
        self.epoch, self.skip = 0, {}

    def shards_for(self, epoch: int, worker: int, workers: int) -> list[Path]:
        """This (rank, worker)'s shards in `epoch`: a per-epoch permutation dealt round-robin."""
        order = _rng(self.seed, epoch).permutation(len(self.index["shards"]))
        readers = self.world_size * workers
        me = self.rank * workers + worker
        return [self.folder / self.index["shards"][i]["file"] for i in order[me::readers]]

    def records(self, epoch: int, worker: int, workers: int) -> Iterator[ShardRecord]:
        """The shuffled record order for one (epoch, rank, worker), decided without decoding audio."""
        rng = _rng(self.seed, epoch, self.rank, worker, 1)
        buffer: list[ShardRecord] = []
        for shard in self.shards_for(epoch, worker, workers):
            for record in iter_shard(shard):
                if record.error:  # errors pass straight through: they carry no audio to shuffle
                    yield record
                    continue
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(record)
                    continue
                pick = int(rng.integers(len(buffer)))
                buffer[pick], record = record, buffer[pick]
                yield record
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        already = self.skip.get(worker, 0)
        for position, record in enumerate(self.records(self.epoch, worker, workers)):
            if position < already:
                continue
            item = self.make_item(record, self.epoch)
            item["worker"] = worker
            yield item
