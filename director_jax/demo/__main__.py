"""The CPU demo, the README's first command: the whole system on synthetic movies, on a CPU, in minutes.

    python -m director_jax.demo --config configs/demo.py --workdir runs/demo
    python -m director_jax.demo --workdir runs/demo_quick --quick          # smoke run: tiny budgets

Stages (timed, in ``WORKDIR/report.json``):
1. synthetic movies as real mp4 files (training movies; held-out showcase movies with ground truth);
2. curation of the training movies by ``director_jax.curate``'s pipeline (shots, filters, samples);
3. the tiny Wan-architecture VAE fitted on the curated clips (``WORKDIR/vae``);
4. the curated clips as TFDS shards (``WORKDIR/curated/tfds``), then Director-Gen and Director-SR
   trained by ``python -m director_jax.train``'s trainer with per-example timelines (every row its own
   task and keyframes), each on the latent cache ``python -m director_jax.encode`` writes for it
   (``WORKDIR/latents/gen``, ``WORKDIR/latents/sr``; ``WORKDIR/gen``, ``WORKDIR/sr``: trainer runs);
5. the showcase through ``generate`` (``WORKDIR/showcase``);
6. ``evaluate``'s synthetic suite on held-out movies and its curated suite on held-out footage curated like the
   training movies (``WORKDIR/heldout``), each with the cross-fade baseline (``WORKDIR/eval*``);
7. PyTorch export: the Gen DiT and VAE as diffusers directories, one showcase video re-made by the
   PyTorch pipeline from them (``WORKDIR/export``);
8. ``WORKDIR/report.html``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from director_jax import cli
from director_jax.build import load_director_gen, load_frozen_vae
from director_jax.configs_common import load_config
from director_jax.convert import export_transformer, export_vae
from director_jax.curation.pipeline import curate
from director_jax.demo import data, report, showcase, stages
from director_jax.eval.run import run_evaluation
from director_jax.io_utils import atomic_write_text
from director_jax.models.timeline import Timeline, place_given_frames

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Demo config (a get_config() file).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Where movies, models, videos and the report are written.")
_QUICK = flags.DEFINE_bool("quick", False, "Tiny budgets: checks that every stage runs (numbers not meaningful).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Progress bars.")
_REUSE = flags.DEFINE_list("reuse", [], "Stages whose models in WORKDIR are loaded, not trained again (vae, gen, sr): "
                           "to rerun later stages after changing their settings.")

log = logging.getLogger("director_jax.demo")

SHOWCASE_SEED = 8_000_000


def quick(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Budgets for a smoke run of every stage."""
    cfg.data.train_movies = 6
    cfg.vae.steps = 40
    cfg.gen.update(dict(steps=20, sampler_steps=2, timelines_per_clip=2))
    cfg.sr.update(dict(steps=10, sampler_steps=1, timelines_per_clip=1))
    cfg.eval.update(dict(movies=2, fvd=False, curated_movies=3, curated_clips=4))
    return cfg


class Stages:
    """Times each stage and logs it as it starts and ends."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.start = time.time()

    def run(self, name: str, fn, *args, **kw):
        print(f"[demo] {name} ...", flush=True)
        t0 = time.time()
        out = fn(*args, **kw)
        self.seconds[name] = round(time.time() - t0, 1)
        print(f"[demo] {name}: {self.seconds[name]} s (total {time.time() - self.start:.0f} s)", flush=True)
        return out


def evaluate(cfg: ml_collections.ConfigDict, workdir: Path, progress: bool) -> dict:
    """``evaluate``'s synthetic suite (configs/eval_synthetic.py) and curated suite (configs/eval_curated.py, on the
    held-out footage) on the demo's Gen, each with the cross-fade baseline."""
    ecfg = load_config(stages.CONFIGS / "eval_synthetic.py")
    ecfg.model_config = str(workdir / "gen" / "config.py")
    ecfg.movies.count = int(cfg.eval.movies)
    ecfg.metrics.fvd = bool(cfg.eval.fvd)
    model = run_evaluation(ecfg, workdir / "eval", ckpt=workdir / "gen", progress=progress)
    baseline = run_evaluation(ecfg, workdir / "eval_crossfade", baseline="crossfade", progress=progress)
    ccfg = load_config(stages.CONFIGS / "eval_curated.py")
    ccfg.update(dict(model_config=ecfg.model_config, data=str(workdir / "heldout" / "curated"), split="all",
                     max_clips=int(cfg.eval.curated_clips)))
    ccfg.metrics.fvd = bool(cfg.eval.fvd) and bool(cfg.eval.curated_fvd)
    curated = run_evaluation(ccfg, workdir / "eval_curated", ckpt=workdir / "gen", progress=progress)
    curated_base = run_evaluation(ccfg, workdir / "eval_curated_crossfade", baseline="crossfade", progress=progress)
    return {"model": model["aggregate"], "crossfade": baseline["aggregate"], "by_template": model["by_template"],
            "crossfade_by_template": baseline["by_template"], "cases": len(model["cases"]),
            "curated": {"model": curated["aggregate"], "crossfade": curated_base["aggregate"],
                        "by_template": curated["by_template"], "by_distance": curated["by_distance"],
                        "crossfade_by_distance": curated_base["by_distance"], "cases": len(curated["cases"]),
                        "warnings": curated["warnings"]}}


def export_check(workdir: Path, gen_cfg: ml_collections.ConfigDict, row: dict) -> dict:
    """Exports Gen's DiT and the VAE as diffusers directories; PyTorch re-makes showcase ``row`` from them."""
    from director_jax.pytorch.pipeline import TorchDirectorPipeline, jax_noise, noise_shape, psnr  # optional: torch


    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    gen, _ = load_director_gen(gen_cfg, workdir / "gen", sharding=sharding)
    vae = load_frozen_vae(gen_cfg, sharding=sharding)
    out = workdir / "export"
    shutil.rmtree(out, ignore_errors=True)
    export_vae(vae, out / "vae")
    export_transformer(gen.dit, out / "transformer")
    t0 = time.time()
    pipe = TorchDirectorPipeline.from_pretrained(out / "vae", out / "transformer")
    lowres = row["_lowres"]
    layout = Timeline.from_keyframes(len(lowres), row["given_frames"]).layout  # a keyframes-only case
    video = place_given_frames(len(lowres), row["_given"])[None]
    s = gen_cfg.sampler
    shape = noise_shape(layout, 1, lowres.shape[1], lowres.shape[2], vae.config.z_dim, vae.config.spatial_factor)
    text = np.zeros((1, 1, int(gen_cfg.model.text_dim)), np.float32)
    torch_video, _ = pipe(layout, video, text, jax_noise(0, shape), text_mask=np.zeros((1, 1), bool),
                          steps=int(s.steps), sampler=str(s.name), shift=float(s.shift),
                          keyframe_guidance=float(s.get("keyframe_guidance", 1.0)))
    return {"case": row["name"], "psnr_db": float(psnr(torch_video[0], lowres)), "seconds": round(time.time() - t0, 1),
            "directories": [str(out / "vae"), str(out / "transformer")]}


def main(_) -> None:
    cfg = _CONFIG.value
    if _QUICK.value:
        cfg = quick(cfg)
    workdir = Path(_WORKDIR.value)
    progress = _PROGRESS.value
    workdir.mkdir(parents=True, exist_ok=True)
    t = Stages()
    scale = int(cfg.data.sr_scale)

    t.run("movies", data.write_movies, workdir / "movies" / "train", 1000, int(cfg.data.train_movies), cfg.data,
          max_shapes=int(cfg.data.train_max_shapes), progress=progress)
    shows = t.run("showcase movies", data.write_movies, workdir / "movies" / "showcase", SHOWCASE_SEED, 1, cfg.data,
                  max_shapes=1, progress=False)
    shutil.rmtree(workdir / "curated", ignore_errors=True)
    movies = sorted(str(p) for p in (workdir / "movies" / "train").glob("*.mp4"))  # not the truth JSONs beside
    summary = t.run("curate", curate, movies, workdir / "curated",
                    data.curation_config(progress))
    samples = data.read_curated(workdir / "curated")
    t.run("shards", stages.build_shards, workdir, progress=progress)
    heldout = t.run("held-out footage", data.heldout_footage, workdir / "heldout", int(cfg.eval.curated_first_seed),
                    int(cfg.eval.curated_movies), cfg.data, progress=progress)
    reuse = set(_REUSE.value)
    if reuse - {"vae", "gen", "sr"}:
        raise app.UsageError(f"--reuse {sorted(reuse)}: choose among vae, gen, sr.")
    if "vae" in reuse:
        vae, vae_log = stages.reused_vae(workdir), [{"step": 0, "l1": float("nan"), "note": "reused"}]
    else:
        vae, vae_log = t.run("fit VAE", stages.fit_demo_vae, cfg, samples, workdir, progress=progress)
    if "gen" in reuse:
        gen_cfg, gen_log = stages.reused(workdir / "gen")
    else:
        gen_cfg, gen_log = t.run("train Director-Gen", stages.train_gen, cfg, vae, workdir, progress=progress)
    if "sr" in reuse:
        sr_cfg, sr_log = stages.reused(workdir / "sr")
    else:
        sr_cfg, sr_log = t.run("train Director-SR", stages.train_sr, cfg, vae, workdir, progress=progress)

    out = workdir / "showcase"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rows = t.run("showcase", lambda: [showcase.run_case(c, shows[0], out, gen_cfg, workdir / "gen", sr_cfg,
                                                        workdir / "sr", scale, seed=0)
                                      for c in showcase.cases(shows[0])])
    evaluation = t.run("evaluate", evaluate, cfg, workdir, progress)
    export = None
    if cfg.export.torch_check:
        export = t.run("PyTorch export", export_check, workdir, gen_cfg,
                       next(r for r in rows if r["name"].startswith("three keyframes")))
    summary_out = {
        "config": cfg.to_dict(), "timings_s": t.seconds, "total_s": round(time.time() - t.start, 1),
        "devices": stages.devices_note(), "curation": summary, "heldout_curation": heldout, "vae_fit": vae_log,
        "gen_train": gen_log,
        "sr_train": sr_log, "showcase": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
        "evaluation": evaluation, "export": export,
    }
    atomic_write_text(workdir / "report.json", json.dumps(summary_out, indent=2, default=float))
    page = report.write_report(workdir, summary_out)
    agg, base = evaluation["model"], evaluation["crossfade"]
    print(f"report: {page}")
    print(f"  held-out keyframe PSNR {agg['keyframe_psnr']:.2f} dB (target >= 28); trajectory error "
          f"{agg['trajectory_error_px']:.2f} px vs cross-fade {base['trajectory_error_px']:.2f} px")
    if export:
        print(f"  PyTorch pipeline vs JAX ({export['case']}): {export['psnr_db']:.1f} dB (target >= 40)")
    print(f"  total {summary_out['total_s']:.0f} s")


if __name__ == "__main__":
    cli.run(main, level=logging.WARNING)
