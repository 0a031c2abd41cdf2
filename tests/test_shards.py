import json
import tarfile

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import DEMO
from whisper_lora.audio import load_audio
from whisper_lora.data import collate
from whisper_lora.errors import UserError
from whisper_lora.manifest import read_manifest
from whisper_lora.shards import ShardStream, iter_shard, read_index, write_shards


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    samples = read_manifest(DEMO / "train.jsonl")[:22]
    folder = tmp_path_factory.mktemp("shards")
    index, rejected = write_shards(samples, folder, shard_size=5, progress=False)
    assert rejected == [] and index["samples"] == 22 and len(index["shards"]) == 5
    return folder


def ids_of(stream: ShardStream, epoch: int, worker: int = 0, workers: int = 1) -> list[str]:
    return [r.meta["id"] for r in stream.records(epoch, worker, workers)]


def key_item(record, epoch):
    return {"id": record.meta["id"] if record.meta else record.key, "error": record.error}


def test_shards_hold_the_decoded_audio_and_metadata(shard_dir):
    samples = {s.id: s for s in read_manifest(DEMO / "train.jsonl")[:22]}
    import io
    record = next(iter_shard(shard_dir / "shard-00000.tar"))
    original = samples[record.meta["id"]]
    audio, rate = sf.read(io.BytesIO(record.flac), dtype="float32")
    assert rate == 16000 and record.meta["text"] == original.text and record.meta["language"] == "zh"
    assert np.abs(audio - load_audio(original.audio_path)).max() < 1e-4  # 16-bit FLAC of the decoded clip
    with tarfile.open(shard_dir / "shard-00000.tar") as tar:  # WebDataset naming: key.ext, pairs in order
        assert tar.getnames()[:2] == ["000000.json", "000000.flac"]


def test_every_rank_and_worker_reads_disjoint_shards_covering_the_epoch(shard_dir):
    everyone = []
    for rank in range(2):
        stream = ShardStream(shard_dir, key_item, seed=3, shuffle_buffer=4, rank=rank, world_size=2, num_workers=2)
        for worker in range(2):
            everyone.append(ids_of(stream, epoch=0, worker=worker, workers=2))
    flat = [i for part in everyone for i in part]
    assert len(flat) == 22 and len(set(flat)) == 22  # each sample exactly once across 2 ranks x 2 workers
    assert all(everyone), [len(part) for part in everyone]  # with 5 shards, every one of the 4 readers has data
    # readers split the epoch by whole shards: each shard's samples all go to one reader
    reader_of = {i: n for n, part in enumerate(everyone) for i in part}
    for shard in read_index(shard_dir)["shards"]:
        readers = {reader_of[r.meta["id"]] for r in iter_shard(shard_dir / shard["file"])}
        assert len(readers) == 1, (shard["file"], readers)


def test_order_is_deterministic_per_epoch_and_reshuffled_between_epochs(shard_dir):
    stream = ShardStream(shard_dir, key_item, seed=3, shuffle_buffer=4)
    first = ids_of(stream, 0)
    assert first == ids_of(ShardStream(shard_dir, key_item, seed=3, shuffle_buffer=4), 0)
    assert sorted(first) == sorted(ids_of(stream, 1)) and first != ids_of(stream, 1)
    stored = [json.loads(json.dumps(r.meta))["id"] for shard in read_index(shard_dir)["shards"]
              for r in iter_shard(shard_dir / shard["file"])]
    assert first != stored  # the buffer shuffles within and across shards


def test_resume_skips_exactly_what_was_consumed_in_real_worker_processes(shard_dir):
    def run(skip):
        stream = ShardStream(shard_dir, key_item, seed=5, shuffle_buffer=3, num_workers=2)
        stream.skip = skip
        loader = torch.utils.data.DataLoader(stream, batch_size=2, num_workers=2,
                                             collate_fn=lambda items: items)
        return [item for batch in loader for item in batch]

    full = run({})
    assert sorted(i["id"] for i in full) == sorted(s.id for s in read_manifest(DEMO / "train.jsonl")[:22])
    consumed = full[:7]  # "killed" after 7 samples
    per_worker = {w: sum(1 for i in consumed if i["worker"] == w) for w in (0, 1)}
    rest = run(per_worker)
    assert sorted(i["id"] for i in consumed + rest) == sorted(i["id"] for i in full)  # none twice, none lost


def test_truncated_shard_reports_where_and_training_goes_on(tmp_path):
    samples = read_manifest(DEMO / "train.jsonl")[:6]
    write_shards(samples, tmp_path, shard_size=3, progress=False)
    damaged = tmp_path / "shard-00001.tar"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    records = [r for shard in ("shard-00000.tar", "shard-00001.tar") for r in iter_shard(tmp_path / shard)]
    errors = [r.error for r in records if r.error]
    assert len([r for r in records if not r.error]) >= 3 and len(errors) == 1
    assert "shard-00001.tar" in errors[0] and "truncated or corrupt" in errors[0]


def test_too_few_shards_for_the_readers_and_bad_index_are_refused(shard_dir, tmp_path):
    with pytest.raises(UserError, match="5 shards cannot give each of 4 processes x 2"):
        ShardStream(shard_dir, key_item, world_size=4, num_workers=2)
    (tmp_path / "shards.json").write_text("{}")
    with pytest.raises(UserError, match="not a whisper-lora shard index"):
        read_index(tmp_path)


def test_collate_carries_ids_and_workers_of_good_and_bad_items():
    items = [{"index": -1, "id": "a", "error": "x: bad", "source": "x", "worker": 1},
             {"index": 0, "id": "b", "input_features": np.zeros((80, 3000), np.float32), "labels": [1], "worker": 0}]
    batch = collate(items)
    assert batch["ids"] == ["a", "b"] and batch["workers"] == [1, 0] and len(batch["skipped"]) == 1
