"""``python -m director_jax.encode --config CONFIG --cache_dir DIR [--timelines_per_clip K] [--config.a.b=value ...]``

Writes the latent cache a Director-Gen or Director-SR run reads with ``--config.data.source=latents
--config.data.latents.dir DIR --config.train.latents=precomputed``: the curated split's clips
(``data.curated``), each as K seeded per-example timelines (window and task drawn as the curated
loader draws epochs 0..K-1), encoded by the frozen VAE ``vae.init_from`` at the config's video size,
with their caption embeddings; for an SR config also each clip degraded by the SR task's seeded
degradations, upsampled and encoded alike. Saves the decode, the degradations and the VAE encodes of
every training step.

Rerun the same command after a crash: complete shards are kept, partial ones redone, and the files
come out byte-identical to an uninterrupted run. On a pod run it on every host (``--distributed
auto``, as ``python -m director_jax.train``): each host encodes its share of the shards; the last to
finish writes ``DIR/manifest.json``. Format: ``director_jax.data.latent_cache``; the job:
``director_jax.curation.latent_writer``.
"""

from __future__ import annotations

import jax
from absl import flags
from ml_collections import config_flags

from director_jax import cli
from director_jax.curation.latent_writer import plan_job, write_latent_cache
from director_jax.errors import UserError
from director_jax.parallel.distributed import DistributedFlags

_CONFIG = config_flags.DEFINE_config_file("config", None,
                                          "A Director-Gen or Director-SR config (get_config()); see configs/.")
_CACHE_DIR = flags.DEFINE_string("cache_dir", None, "Where the cache goes (shards, job.json, manifest.json).")
_K = flags.DEFINE_integer("timelines_per_clip", 1, "Seeded timelines (window + task) per clip.")
_SHARD_SIZE = flags.DEFINE_integer("shard_size", 64, "Examples per shard file (the unit of work and of resume).")
_BATCH = flags.DEFINE_integer("batch", 4, "Examples decoded together, and chunks per VAE call.")
_DTYPE = flags.DEFINE_enum("latent_dtype", "bfloat16", ["bfloat16", "float16", "float32"],
                           "How the latents are stored.")
_WORKERS = flags.DEFINE_integer("decode_workers", 4, "Threads decoding clips.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
_DISTRIBUTED = DistributedFlags()


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}: every setting is a --flag.")
    cfg = _CONFIG.value
    if cfg is None:
        raise UserError("--config is required, e.g. --config configs/gen_tiny.py")
    if not _CACHE_DIR.value:
        raise UserError("--cache_dir is required (where the latent cache goes).")
    # the inputs are checked before the (possibly slow) distributed start-up and the VAE load
    plan_job(cfg, _CACHE_DIR.value, timelines_per_clip=_K.value, shard_size=_SHARD_SIZE.value, batch=_BATCH.value,
             latent_dtype=_DTYPE.value)
    try:
        _DISTRIBUTED.initialize()
    except ValueError as e:
        raise UserError(str(e)) from e
    manifest = write_latent_cache(cfg, _CACHE_DIR.value, timelines_per_clip=_K.value, shard_size=_SHARD_SIZE.value,
                                  batch=_BATCH.value, latent_dtype=_DTYPE.value, process_index=jax.process_index(),
                                  process_count=jax.process_count(), decode_workers=_WORKERS.value,
                                  progress=_PROGRESS.value)
    if manifest is not None:
        print(f"{_CACHE_DIR.value}: {manifest['count']} examples, {manifest['bytes'] / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    cli.run(main)
