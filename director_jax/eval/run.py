"""One evaluation run: cases -> videos (a Director-Gen checkpoint or a baseline) -> metrics -> files.

``run_evaluation`` is what ``python -m director_jax.evaluate`` calls; tests and notebooks call it
directly. Every process of a multi-host run calls it; process 0 writes the files.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from director_jax.build import load_director_gen, load_frozen_vae
from director_jax.build.loading import inference_config
from director_jax.eval.baselines import crossfade
from director_jax.eval.checks import SUITES, resolve_model_config
from director_jax.eval.curated import case_list, curated_cases, suite_shape
from director_jax.eval.generate import eval_mesh, generate_cases, model_sharded
from director_jax.eval.report import write_metrics, write_report
from director_jax.eval.scoring import MetricSettings, score
from director_jax.eval.suite import EvalCase, synthetic_cases
from director_jax.io_utils import atomic_write_text, dir_path
from director_jax.parallel.rules import rules_from_config
from director_jax.pipeline.settings import SamplingSettings, sampling_settings, text_inputs
from director_jax.pipeline.text_encoder import JaxTextEncoder

BASELINES = ("crossfade", "reference")


def eval_sampling(cfg: ml_collections.ConfigDict, model_cfg: ml_collections.ConfigDict) -> SamplingSettings:
    """The eval config's sampler fields where set, else the model config's ``sampler`` section."""
    s = cfg.sampler
    return sampling_settings(model_cfg, sampler=s.get("name"), steps=s.get("steps"), shift=s.get("shift"),
                             guidance_scale=s.get("guidance_scale"), keyframe_guidance=s.get("keyframe_guidance"))


@dataclasses.dataclass
class Suite:
    """A suite's cases, what describes them in metrics.json, and (curated) the case list to save."""

    cases: list[EvalCase]
    info: dict
    skipped: list[dict] = dataclasses.field(default_factory=list)
    case_list: dict | None = None


def build_cases(cfg: ml_collections.ConfigDict, model_cfg: ml_collections.ConfigDict) -> Suite:
    """The config's suite on the model's video size, fps and clip length (``synthetic`` or ``curated``)."""
    v = model_cfg.video
    size = dict(height=int(v.height), width=int(v.width), fps=float(v.fps), num_frames=int(v.num_frames))
    if cfg.suite == "synthetic":
        return Suite(synthetic_cases(cfg, **size), {"movies": cfg.movies.to_dict(),
                                                    "templates": [dict(t) for t in cfg.cases]})
    if cfg.suite == "curated":
        shape = suite_shape(cfg, **size)
        cases, skipped = curated_cases(cfg, shape)
        info = {"split": str(cfg.split), "max_clips": int(cfg.max_clips), "video": shape.as_dict(),
                "keyframes": [int(cfg.min_keyframes), int(cfg.max_keyframes)],
                "cases_file": bool(cfg.get("cases_file"))}
        return Suite(cases, info, skipped, case_list(cases, shape, str(cfg.data), str(cfg.split), int(cfg.seed)))
    raise ValueError(f"config.suite={cfg.suite!r}; available suites: {SUITES}.")


def baseline_videos(name: str, cases: Sequence[EvalCase]) -> dict[int, np.ndarray]:
    """``crossfade``: linear blends between the keyframes; ``reference``: the true clips (every metric's best)."""
    if name == "crossfade":
        return {c.index: crossfade(c.reference, c.keyframes) for c in cases}
    if name == "reference":
        return {c.index: c.reference.copy() for c in cases}
    raise ValueError(f"baseline {name!r}; choose one of {BASELINES}.")


def run_evaluation(cfg: ml_collections.ConfigDict, workdir: str | Path, *, ckpt: str | Path | None = None,
                   baseline: str | None = None, step: int | None = None,
                   devices: Sequence[jax.Device] | None = None, progress: bool = True) -> dict:
    """Evaluates a checkpoint (``ckpt``) or a baseline on the config's suite; writes metrics.json and report.html.

    Returns the content of metrics.json (before NaN -> null). ``devices`` (default: all) is where
    cases are generated; the numbers do not depend on it beyond float32 rounding.
    """
    if (ckpt is None) == (baseline is None):
        raise ValueError("evaluate either a checkpoint (--ckpt DIR) or a baseline (--baseline crossfade), not both "
                         "and not neither.")
    t0 = time.time()
    workdir = dir_path(workdir)  # gs://: written object by object
    model_cfg = resolve_model_config(cfg, None if ckpt is None else str(ckpt), step)
    suite = build_cases(cfg, model_cfg)
    cases = suite.cases
    settings = MetricSettings(**cfg.metrics.to_dict())
    info: dict = {"suite": cfg.suite, "seed": int(cfg.seed), **suite.info,
                  "model_config": str(cfg.model_config or f"{ckpt} (its recorded config)")}
    if baseline is not None:
        videos = baseline_videos(baseline, cases)
        info["evaluated"] = {"baseline": baseline}
        title, label, mesh_size = f"{baseline} baseline", baseline, 0
    else:
        mesh = eval_mesh(cfg.get("mesh", "data"), devices)
        replicated = NamedSharding(mesh, PartitionSpec())
        sharded = model_sharded(mesh)
        dtype = cfg.get("dtype", "float32")
        gen, loaded = load_director_gen(model_cfg, ckpt, sharding=mesh if sharded else replicated, step=step,
                                        weights=cfg.weights, dtype=dtype)
        context = (mesh, rules_from_config(inference_config(model_cfg, dtype=dtype, mesh=mesh))) if sharded else None
        vae = load_frozen_vae(model_cfg, sharding=replicated)
        sampling = eval_sampling(cfg, model_cfg)
        encoder = None
        if model_cfg.text.conditioning and cfg.get("text_encoder"):
            encoder = JaxTextEncoder(cfg.text_encoder, dtype=cfg.get("text_dtype", "bfloat16"),
                                     max_length=int(model_cfg.text.max_length))
        text = text_inputs(model_cfg, [c.caption for c in cases], text_cache=cfg.text_cache, text_encoder=encoder,
                           guidance_scale=sampling.guidance_scale)
        videos = generate_cases(gen, vae, cases, text, seed=int(cfg.seed), sampling=sampling, mesh=mesh,
                                cases_per_device=int(cfg.cases_per_device), progress=progress,
                                mesh_context=context)
        info["evaluated"] = {"checkpoint": loaded.directory, "step": loaded.step,  # absolute, or gs://...
                             "weights": loaded.weights, "skipped_steps": list(loaded.skipped),
                             "sampling": sampling.__dict__,
                             "mesh": {a: int(n) for a, n in mesh.shape.items() if n > 1}, "dtype": dtype}
        label = "generated"
        title, mesh_size = f"Director-Gen step {loaded.step} ({loaded.weights})", mesh.size
    generated_s = time.time() - t0
    results = score(cases, videos, settings, progress=progress)
    results["run"] = info
    results["settings"] = dataclasses.asdict(settings)
    if suite.skipped:
        results["skipped"] = suite.skipped
        results.setdefault("warnings", []).append(
            f"{len(suite.skipped)} clip(s) skipped (too short for the suite; listed under skipped).")
    if jax.process_index() == 0:
        if suite.case_list is not None:
            atomic_write_text(workdir / "cases.json", json.dumps(suite.case_list, indent=1, sort_keys=True) + "\n")
        write_metrics(workdir, results)
        run_info = {"devices": mesh_size or "none (no generation)", "processes": jax.process_count(),
                    "generate_s": round(generated_s, 1), "total_s": round(time.time() - t0, 1)}
        write_report(workdir, results, cases, videos, title=title, label=label, run_info=run_info,
                     media_cases=int(cfg.report.media_cases))
    return results
