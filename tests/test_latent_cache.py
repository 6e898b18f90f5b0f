"""The latent cache: the job's latents are the loader's windows encoded by the VAE, a killed job resumes to the
same bytes, two hosts write what one writes, and the reader feeds the trainer deterministically and resumably.

Curated shards are built the real way (mp4 clips, a bf16 text-embedding cache, the TFDS builder) and the
VAE is a tiny random one exported as a diffusers directory, what ``vae.init_from`` names in real runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from flax import nnx

from director_jax.build import frozen_vae
from director_jax.build.sections import vae_config_from
from director_jax.configs_common import load_config
from director_jax.convert import export_vae
from director_jax.curation import latent_writer
from director_jax.curation.latent_writer import plan_job, write_latent_cache
from director_jax.curation.shards import build_curated_dataset
from director_jax.data.iterators import make_iterator
from director_jax.data.latent_cache import (
    JOB_FILE,
    MANIFEST_FILE,
    LatentCacheConfig,
    decode_record,
    latent_cache_config,
    make_latent_dataset,
)
from director_jax.data.loader import ExampleMaker
from director_jax.data.row_timelines import row_layout
from director_jax.errors import UserError
from director_jax.models.vae import WanVAE
from director_jax.pipeline.gen import timeline_latents
from director_jax.train.sr_task import degrade_batch, keyframes_kept
from director_jax.train.tasks import make_task
from director_jax.train.trainer import build_run, global_batch, train
from tests.test_shards import all_captions, make_curated_dir, make_text_cache, window_truth

ROOT = Path(__file__).resolve().parents[1]
JOB = dict(timelines_per_clip=2, shard_size=5, batch=3)  # 12 clips x 2 = 24 examples in 5 shards


def _cfg(root: Path, vae_dir: Path) -> ml_collections.ConfigDict:
    cfg = load_config(ROOT / "configs" / "gen_tiny.py")
    cfg.data.curated.dir = str(root)
    cfg.vae.init_from = str(vae_dir)
    return cfg


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """(cfg, reference cache dir, manifest, caption -> embedding)."""
    root = tmp_path_factory.mktemp("curated")
    samples = make_curated_dir(root)
    truth = make_text_cache(root / "cache", all_captions([s for s, _ in samples]), dtype="bfloat16", dim=32,
                            max_length=16)
    build_curated_dataset(root, text_cache=root / "cache", text_max_length=16, validation_fraction=0.0,
                          progress=False)
    cfg = load_config(ROOT / "configs" / "gen_tiny.py")
    vae_dir = export_vae(WanVAE(vae_config_from(cfg.vae), rngs=nnx.Rngs(0)), root / "vae")
    cfg = _cfg(root, vae_dir)
    out = root / "latents"
    manifest = write_latent_cache(cfg, out, progress=False, **JOB)
    return cfg, out, manifest, truth


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def _records(d: Path) -> list[dict[str, np.ndarray]]:
    from array_record.python.array_record_module import ArrayRecordReader

    out = []
    for p in sorted(d.glob("shard-*.array_record")):
        reader = ArrayRecordReader(str(p))
        out += [decode_record(r) for r in reader.read_all()]
        reader.close()
    return out


def test_cached_latents_are_the_loaders_windows_encoded_by_the_vae(cache):
    cfg, out, manifest, truth = cache
    assert manifest["count"] == 24 and len(manifest["shards"]) == 5 and manifest["job"]["latent_dtype"] == "bfloat16"
    records = _records(out)
    job = plan_job(cfg, out, **JOB)
    make, vae = ExampleMaker(job.loader, job.data), frozen_vae(cfg)
    for e in (0, 23):  # timeline 0 of the first clip and timeline 1 of the last (other shards, windows, tasks)
        rec, k, record = records[e], e % 2, int(job.clips[e // 2])
        assert (int(rec["index"]), int(rec["timeline"])) == (record, k)
        example = make((k, record))  # the loader's epoch-k window and task of this record, decoded afresh
        np.testing.assert_array_equal(rec["given"], example["given"])
        layout = row_layout(example["given"], example["given_start"])
        expected = np.asarray(timeline_latents(vae, example["video"][None], layout))[0]
        assert rec["latents"].dtype.name == "bfloat16" and rec["latents"].shape == expected.shape
        np.testing.assert_allclose(rec["latents"].astype(np.float32), expected, rtol=1e-2, atol=1e-2)
        source = job.data.record(record)  # its sample-relative cuts and whole caption: the window's shots' caption
        line = {"start_frame": 0, "cuts": source["cuts"].tolist(), "caption": source["caption"].decode()}
        caption, _ = window_truth(line, rec["frame_index"])
        np.testing.assert_array_equal(rec["text"], truth[caption])  # the stored dtype, bit-exact, unpadded
    assert records[0]["timeline"] != records[1]["timeline"] and not np.array_equal(records[0]["given"],
                                                                                    records[2]["given"])


def test_a_failed_run_resumes_to_byte_identical_files(cache, tmp_path, monkeypatch):
    cfg, out, _, _ = cache
    real, calls = latent_writer._write_shard, []

    def failing(*args, **kwargs):
        if len(calls) == 2:
            raise RuntimeError("injected failure")
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(latent_writer, "_write_shard", failing)
    with pytest.raises(RuntimeError, match="injected"):
        write_latent_cache(cfg, tmp_path, progress=False, **JOB)
    monkeypatch.setattr(latent_writer, "_write_shard", real)
    assert not (tmp_path / MANIFEST_FILE).exists() and len(list(tmp_path.glob("shard-*"))) == 2
    stray = tmp_path / ".shard-00003-of-00005.array_record.abc123.tmp.array_record"
    stray.write_bytes(b"half a shard")  # what a kill during the write leaves
    written = []
    monkeypatch.setattr(latent_writer, "_write_shard", lambda *a, **k: (written.append(a[1]), real(*a, **k)))
    write_latent_cache(cfg, tmp_path, progress=False, **JOB)
    assert written == [2, 3, 4] and not stray.exists()
    assert _files(tmp_path) == _files(out)


@pytest.mark.slow  # a second full job (~13 s); the default run keeps the resume test
def test_two_hosts_write_exactly_what_one_host_writes(cache, tmp_path):
    cfg, out, _, _ = cache
    assert write_latent_cache(cfg, tmp_path, process_index=0, process_count=2, progress=False, **JOB) is None
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == ["shard-00000-of-00005.array_record",
                                                                 "shard-00002-of-00005.array_record",
                                                                 "shard-00004-of-00005.array_record"]
    assert write_latent_cache(cfg, tmp_path, process_index=1, process_count=2, progress=False, **JOB) is not None
    assert _files(tmp_path) == _files(out)


@pytest.mark.slow  # a killed subprocess and a rerun (~15 s); the injected failure above runs by default
def test_the_command_killed_midway_and_rerun_gives_the_same_files(cache, tmp_path):
    cfg, out, _, _ = cache
    cmd = [sys.executable, "-m", "director_jax.encode", "--config", str(ROOT / "configs" / "gen_tiny.py"),
           f"--config.data.curated.dir={cfg.data.curated.dir}", f"--config.vae.init_from={cfg.vae.init_from}",
           "--cache_dir", str(tmp_path), "--timelines_per_clip=2", "--shard_size=5", "--batch=3", "--noprogress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not list(tmp_path.glob("shard-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the job ended before the kill: the test proves nothing"
    complete = list(tmp_path.glob("shard-*-of-00005.array_record"))
    assert len(complete) >= 1, "killed before any shard was written: nothing to resume"
    assert len(complete) < 5, "every shard was written before the kill: nothing to redo"
    assert not (tmp_path / MANIFEST_FILE).exists()
    kept = {p.name: p.stat().st_mtime_ns for p in complete}
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert "24 examples" in done.stdout
    assert _files(tmp_path) == _files(out)
    assert {name: (tmp_path / name).stat().st_mtime_ns for name in kept} == kept  # complete shards not rewritten


def test_bad_inputs_are_named_before_any_work(cache, tmp_path):
    cfg, out, _, _ = cache
    cases = [("train.timelines", "fixed", "train.timelines=per_example"),
             ("data.curated.dir", str(tmp_path / "missing"), "no curated TFDS dataset"),
             ("vae.init_from", "", "vae.init_from is empty"),
             ("task", "vae", "feeds Director-Gen")]
    for path, value, message in cases:
        bad = ml_collections.ConfigDict(cfg.to_dict())
        *parents, key = path.split(".")
        section = bad
        for p in parents:
            section = section[p]
        section[key] = value
        with pytest.raises(UserError, match=message):
            plan_job(bad, tmp_path / "c")
    with pytest.raises(UserError, match="timelines_per_clip"):
        plan_job(cfg, tmp_path / "c", timelines_per_clip=0)
    other = ml_collections.ConfigDict(cfg.to_dict())
    other.seed = 7  # other windows: refused, not mixed into the existing cache
    with pytest.raises(latent_writer.OtherJobError, match="another job's cache"):
        write_latent_cache(other, out, progress=False, **JOB)
    cp = subprocess.run([sys.executable, "-m", "director_jax.encode", "--config", str(ROOT / "configs" / "gen_tiny.py"),
                         "--cache_dir", str(tmp_path / "c"), f"--config.vae.init_from={cfg.vae.init_from}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert cp.returncode == 2 and cp.stderr.strip().splitlines()[-1].startswith("error: config.data.curated.dir is")


def _reader(out: Path, **kw) -> LatentCacheConfig:
    return LatentCacheConfig(dir=str(out), max_latents=11, text_length=64, caption_dropout=0.25, seed=0, **kw)


def _take(it, n: int) -> list[dict[str, np.ndarray]]:
    return [next(it) for _ in range(n)]


def test_reader_batches_are_deterministic_padded_and_resume(cache):
    _, out, _, truth = cache
    ds = make_latent_dataset(_reader(out), global_batch_size=4, shuffle_seed=3)
    it = make_iterator(ds)
    first = next(it)
    state = json.loads(json.dumps(it.get_state()))
    rest = _take(it, 5)
    again = make_iterator(make_latent_dataset(_reader(out), global_batch_size=4, shuffle_seed=3))
    again.set_state(state)
    for a, b in zip(rest, _take(again, 5), strict=True):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    epoch0 = [first, *rest[:2]]  # 12 clips / 4 = 3 batches per epoch: timeline 0, then timeline 1
    assert sorted(int(i) for b in epoch0 for i in b["index"]) == sorted(int(r) for r in range(12))
    assert all((b["timeline"] == 0).all() for b in epoch0) and all((b["timeline"] == 1).all() for b in rest[2:5])
    for b in [first, *rest]:
        n = b["latent_count"]
        assert b["latents"].shape == (4, 11, 8, 8, 16) and (b["latent_valid"].sum(1) == n).all()
        for row in range(4):
            assert not b["latents"][row, n[row]:].any() and b["latents"][row, :n[row]].any()
            emb = truth[""] if b["caption_dropped"][row] else None
            if emb is not None:
                np.testing.assert_array_equal(b["text"][row, :len(emb)], emb.astype(np.float32))
            assert b["text_mask"][row].sum() > 0
    hosts = [next(make_iterator(make_latent_dataset(_reader(out), global_batch_size=4, shuffle_seed=3,
                                                    process_index=p, process_count=2))) for p in (0, 1)]
    assert all(np.array_equal(np.concatenate([h[k] for h in hosts]), first[k]) for k in first)


def test_the_trainer_trains_on_cached_latents(cache, tmp_path):
    cfg, out, _, _ = cache
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.train.latents, cfg.text.conditioning = "precomputed", True
    cfg.mesh.update(dict(data=2, fsdp=4, tensor=1))
    cfg.data.latents = ml_collections.ConfigDict(dict(dir=str(out)))
    run = build_run(cfg)
    ds = make_latent_dataset(latent_cache_config(cfg, max_latents=run.task.buckets[-1]),
                             global_batch_size=int(cfg.train.batch_size), shuffle_seed=int(cfg.seed))
    local = next(make_iterator(ds))
    planned = run.task.data_transform()(local)  # what make_data applies: recomputes the same timeline arrays
    for k in ("latent_given", "latent_valid", "latent_position", "latent_count"):
        np.testing.assert_array_equal(planned[k], local[k])
    batch = global_batch(run, planned)
    assert batch["latents"].shape[:2] == (8, run.task.shapes.bucket_for(int(local["latent_count"].max())))
    assert json.loads((out / JOB_FILE).read_text())["vae"]["init_from"] == cfg.vae.init_from
    # the trainer itself on the cache (data.source="latents"): its first step's rows are the reader's
    cfg.data.source = "latents"
    cfg.train.update(dict(steps=2, log_every=1))
    cfg.checkpoint.every = 2
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.final_step == 2 and all(np.isfinite(v) for v in result.losses.values())
    assert result.data_indices[1] == [int(i) for i in local["index"]]


def test_an_sr_cache_holds_the_degraded_clip_encoded_over_the_same_timeline(cache, tmp_path):
    """An SR config's cache: ``lowres_latents`` are the loader's window degraded as the SR task's data path
    degrades that record (``degrade_batch``), upsampled and encoded over the row's own timeline; the trainer
    trains SR on it, its keyframe dropout drawn per row as on pixels."""
    gen_cfg, _, _, _ = cache
    cfg = load_config(ROOT / "configs" / "sr_tiny.py")
    cfg.data.curated.dir = gen_cfg.data.curated.dir
    cfg.vae.update({k: gen_cfg.vae[k] for k in ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "attn_scales",
                                                 "temperal_downsample", "init_from")})
    cfg.model.update(dict(in_channels=int(gen_cfg.vae.z_dim), out_channels=int(gen_cfg.vae.z_dim)))
    cfg.video.update(dict(height=32, width=32, num_frames=9))
    cfg.degradation.scales = (2,)
    cfg.train.update(dict(timelines="per_example", latents="precomputed", keyframe_dropout=0.5, batch_size=4,
                          keyframes=(0, 8)))
    out = tmp_path / "sr_latents"
    manifest = write_latent_cache(cfg, out, timelines_per_clip=1, shard_size=8, batch=4, latent_dtype="float32",
                                  progress=False)
    assert manifest["job"]["task"] == "sr" and manifest["job"]["degradation"]["scales"] == [2]
    records = _records(out)
    job = plan_job(cfg, out, timelines_per_clip=1, shard_size=8, batch=4, latent_dtype="float32")
    make, vae = ExampleMaker(job.loader, job.data), frozen_vae(cfg)
    task = make_task(cfg)
    for e in (0, 5):
        rec, record = records[e], int(job.clips[e])
        example = make((0, record))
        layout = row_layout(example["given"], example["given_start"])
        pixels = degrade_batch({"video": example["video"][None], "index": np.asarray([record])},
                               degradation=task.degradation, seed=int(cfg.seed), keyframe_dropout=0.0)
        for name, video in (("latents", example["video"][None]), ("lowres_latents", pixels["upsampled"])):
            expected = np.asarray(timeline_latents(vae, video, layout))[0]
            np.testing.assert_allclose(rec[name], expected, rtol=1e-5, atol=1e-5)
        assert float(np.abs(rec["latents"] - rec["lowres_latents"]).mean()) > 1e-3  # degraded: not the clip's own
    cfg.data.source = "latents"
    cfg.data.latents = ml_collections.ConfigDict(dict(dir=str(out)))
    cfg.train.update(dict(steps=2, log_every=1))
    cfg.checkpoint.every = 2
    run = build_run(cfg)
    rows = next(make_iterator(make_latent_dataset(latent_cache_config(cfg, max_latents=run.task.buckets[-1]),
                                                  global_batch_size=4, shuffle_seed=int(cfg.seed))))
    planned = run.task.data_transform()(rows)
    kept = [keyframes_kept(int(cfg.seed), int(i), 0.5) for i in rows["index"]]
    np.testing.assert_array_equal(planned["latent_given"].any(axis=1), kept)  # dropped rows: every frame generated
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.final_step == 2 and all(np.isfinite(v) for v in result.losses.values())
    gen_cfg = ml_collections.ConfigDict(gen_cfg.to_dict())  # a Gen run refuses the SR cache, and the other way
    gen_cfg.update(dict(data=ml_collections.ConfigDict({**gen_cfg.data.to_dict(), "latents": {"dir": str(out)}})))
    gen_cfg.video.update(dict(height=32, width=32, num_frames=9))
    with pytest.raises(ValueError, match="encoded for task 'sr'"):
        latent_cache_config(gen_cfg, max_latents=10)
    cfg.degradation.noise_prob = 0.0
    with pytest.raises(ValueError, match="degraded with other settings"):
        latent_cache_config(cfg, max_latents=10)
