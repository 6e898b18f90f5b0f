"""The ``vsr`` suite: Director-SR (and bicubic) on video super-resolution benchmarks -> metrics.json, report.html.

For each window of each benchmark sequence (``eval/vsr_data.py``), in one run:

* ``bicubic``: the LR frames upsampled by Pillow's bicubic (``data.degradations.bicubic_upsample``, the
  upsampling the SR model itself is conditioned on);
* ``model``: Director-SR (EMA weights when kept, its frozen VAE; one device) from the LR frames alone;
* ``model_anchored``: the same with the HR frames at the ``anchors`` positions held clean as keyframes.

Both model runs use one timeline layout (chunks starting at the anchors) and the same noise,
``fold_in(key(seed), window index)``, so they differ by the anchors alone. No caption is given (an
SR model trained with captions runs unconditionally). ``--baseline bicubic`` scores bicubic alone,
without a checkpoint.

Metrics (``eval/vsr.py``): PSNR-Y, PSNR-RGB, SSIM-Y, LPIPS of 8-bit outputs; per sequence the mean
over its frames (all windows), then the mean over sequences. ``aggregate`` scores ``bicubic`` and
``model`` on every frame and ``model_anchored`` on its **non-anchor** frames only (the anchors are
the truth, up to the VAE); ``aggregate_non_anchor`` scores every method on the non-anchor frames,
the like-for-like comparison of what the anchors add.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
from pathlib import Path

import jax
import ml_collections
import numpy as np
from PIL import Image
from tqdm import tqdm

from director_jax.build import (
    WEIGHTS,
    check_config_matches,
    dit_config,
    load_director_sr,
    load_frozen_vae,
    step_directory,
    vae_config_from,
)
from director_jax.build.reuse import is_trainer_run
from director_jax.data.degradations import bicubic_upsample
from director_jax.errors import UserError
from director_jax.eval.checks import resolve_model_config
from director_jax.eval.report import write_metrics
from director_jax.eval.vsr import BETTER, METRICS, SSIM_WINDOW, frame_metrics, mean_frames, mean_sequences
from director_jax.eval.vsr_data import (
    Benchmark,
    Window,
    anchor_frames,
    load_window,
    lr_multiple,
    plan_windows,
    scan_benchmark,
)
from director_jax.io_utils import atomic_write_text, dir_path, is_remote, writable_dir_problem
from director_jax.models.lpips import NETS
from director_jax.models.timeline import TEMPORAL_FACTOR, Timeline
from director_jax.pipeline.request import looks_like_weights
from director_jax.pipeline.sr import super_resolve
from director_jax.video_io import contact_sheet, to_uint8

METHODS = ("bicubic", "model", "model_anchored")
BASELINES = ("bicubic",)
MIN_WINDOW = TEMPORAL_FACTOR + 1  # one latent past the first: the shortest clip the VAE compresses in time
SHEET_SIDE = 160  # contact-sheet frames are shrunk to at most this many pixels a side


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a run evaluates, resolved and checked before any model loads."""

    model_cfg: ml_collections.ConfigDict | None
    bench: Benchmark
    windows: list[Window]
    skipped: list[dict]
    frames: int
    min_frames: int
    lr_multiple: int
    crop_border: int


def _whole(value, what: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or int(value) != value or value < minimum:
        raise UserError(f"{what}={value!r}: give a whole number >= {minimum}.")
    return int(value)


def _check_fields(cfg: ml_collections.ConfigDict) -> None:
    if cfg.get("suite") != "vsr":
        raise UserError(f"--config.suite={cfg.get('suite')!r}: this is the vsr suite's runner (configs/eval_vsr.py).")
    if cfg.weights not in WEIGHTS:
        raise UserError(f"--config.weights={cfg.weights!r}: choose one of {WEIGHTS}.")
    if cfg.dtype not in ("float32", "bfloat16"):
        raise UserError(f"--config.dtype={cfg.dtype!r}: choose float32 or bfloat16.")
    for name in ("seed", "scale", "frames", "min_frames", "max_sequences", "max_frames"):
        _whole(cfg[name], f"--config.{name}")
    _whole(cfg.report.media_cases, "--config.report.media_cases")
    _whole(cfg.metrics.crop_border, "--config.metrics.crop_border", minimum=-1)
    if cfg.metrics.lpips_net and cfg.metrics.lpips_net not in NETS:
        raise UserError(f"--config.metrics.lpips_net={cfg.metrics.lpips_net!r}: choose one of {NETS}, or '' for none.")
    tile = cfg.tile if isinstance(cfg.tile, tuple | list) else (cfg.tile,)
    for t in tile:
        _whole(t, "--config.tile")
    _whole(cfg.tile_overlap, "--config.tile_overlap", minimum=-1)
    s = cfg.sampler
    if s.get("steps") is not None:
        _whole(s.steps, "--config.sampler.steps", minimum=1)
    try:
        anchor_frames(cfg.anchors, max(int(cfg.frames), 1))
    except ValueError as e:
        raise UserError(f"--config.anchors: {e}") from None
    if not cfg.data:
        raise UserError("--config.data is empty: give the benchmark folder (--data DIR).")


def _model_config(cfg: ml_collections.ConfigDict, ckpt: str | None, step: int | None
                  ) -> ml_collections.ConfigDict | None:
    if not cfg.model_config and ckpt is None:
        return None
    if ckpt is not None and not cfg.model_config and not is_trainer_run(ckpt):
        what = "a weight source, which records no config" if looks_like_weights(ckpt) else "not a trainer run"
        raise UserError(f"--ckpt {ckpt} is {what}: give a Director-SR trainer run (python -m director_jax.train "
                        "--config configs/sr_tiny.py --workdir DIR), or set --config.model_config.")
    model_cfg = resolve_model_config(cfg, None if ckpt is None else str(ckpt), step)
    task = model_cfg.get("task", "gen")
    if task != "sr":
        where = f"--ckpt {ckpt}" if not cfg.model_config else f"--config.model_config={cfg.model_config!r}"
        raise UserError(f"{where} is a {task!r} model, not Director-SR (task 'sr'): the vsr suite evaluates an SR run.")
    scales = tuple(model_cfg.degradation.scales)
    if len(scales) != 1:
        raise UserError(f"the SR config's degradation.scales={scales}: an SR model upsamples by one factor.")
    return model_cfg


def _check_tile(cfg: ml_collections.ConfigDict, patch: tuple[int, int]) -> None:
    """``tile`` / ``tile_overlap`` (latent pixels) against the DiT patch, as ``SpatialTiling`` will want them."""
    if not cfg.tile:
        return
    tile = tuple(cfg.tile) if isinstance(cfg.tile, tuple | list) else (cfg.tile, cfg.tile)
    for t, p in zip(tile, patch, strict=True):
        if t % p:
            raise UserError(f"--config.tile={cfg.tile}: give a multiple of the DiT patch {p} (latent pixels).")
        if cfg.tile_overlap >= 0 and (cfg.tile_overlap % p or cfg.tile_overlap >= t):
            raise UserError(f"--config.tile_overlap={cfg.tile_overlap}: give a multiple of the DiT patch {p} below "
                            f"the tile {t}, or -1 for one patch.")


def plan(cfg: ml_collections.ConfigDict, ckpt: str | None = None, step: int | None = None) -> Plan:
    """The model config, the benchmark's windows and what is skipped; ``UserError`` for the first problem."""
    _check_fields(cfg)
    model_cfg = _model_config(cfg, ckpt, step)
    scale = int(cfg.scale) or None
    unit = 1
    if model_cfg is not None:
        model_scale = int(model_cfg.degradation.scales[0])
        if scale is not None and scale != model_scale:
            raise UserError(f"--config.scale={scale} but the SR model upsamples by {model_scale}: leave it 0.")
        scale = model_scale
        _, ph, pw = dit_config(model_cfg.model).patch_size
        factor = vae_config_from(model_cfg.vae).spatial_factor
        unit = math.lcm(factor * ph, factor * pw)
        _check_tile(cfg, (ph, pw))
    try:
        bench = scan_benchmark(cfg.data, scale=scale, hr_dir=cfg.hr_dir, lr_dir=cfg.lr_dir, use_lr=bool(cfg.lr_given),
                               sequences=tuple(cfg.sequences))
    except ValueError as e:
        raise UserError(f"--data: {e}") from None
    frames = int(cfg.frames) or (int(model_cfg.video.num_frames) if model_cfg is not None else 0)
    if frames and any(str(a).startswith("#") and int(str(a)[1:]) >= frames for a in cfg.anchors):
        raise UserError(f"--config.anchors={tuple(cfg.anchors)} lies outside windows of {frames} frames "
                        "(--config.frames, 0: the SR config's video.num_frames).")
    min_frames = int(cfg.min_frames) or min(MIN_WINDOW, frames or MIN_WINDOW)
    multiple = lr_multiple(bench.scale, unit)
    windows, skipped = plan_windows(bench, frames=frames, min_frames=min_frames, lr_multiple=multiple,
                                    anchors=tuple(cfg.anchors), max_frames=int(cfg.max_frames),
                                    max_sequences=int(cfg.max_sequences))
    if not windows:
        reasons = "; ".join(f"{s['sequence']}: {s['reason']}" for s in skipped[:3])
        raise UserError(f"--data {cfg.data}: nothing to evaluate ({reasons}).")
    crop_border = bench.scale if cfg.metrics.crop_border == -1 else int(cfg.metrics.crop_border)
    smallest = min(min(w.crop_hr[2:]) for w in windows)
    if smallest - 2 * crop_border < SSIM_WINDOW:
        raise UserError(f"frames cropped to {smallest} pixels a side leave less than SSIM's {SSIM_WINDOW}-pixel window "
                        f"after --config.metrics.crop_border={crop_border}: lower it or use larger frames.")
    if cfg.metrics.lpips_net and smallest < 32:
        raise UserError(f"LPIPS needs frames of 32 pixels a side or more (these are {smallest}): set "
                        "--config.metrics.lpips_net=''.")
    return Plan(model_cfg, bench, windows, skipped, frames, min_frames, multiple, crop_border)


def check_vsr_evaluation(cfg: ml_collections.ConfigDict, workdir: str, *, ckpt: str | None, baseline: str | None,
                         step: int | None) -> None:
    """Every input of ``run_vsr_evaluation`` checked before a model loads; ``UserError`` names the first problem."""
    if (ckpt is None) == (baseline is None):
        raise UserError("give --ckpt DIR (a Director-SR trainer run) or --baseline bicubic.")
    if baseline is not None and baseline not in BASELINES:
        raise UserError(f"--baseline {baseline}: the vsr suite's baseline is {' or '.join(BASELINES)}.")
    if step is not None and step < 0:
        raise UserError(f"--step={step}: steps count from 0.")
    if ckpt is not None and not is_remote(ckpt) and Path(ckpt).is_file():
        raise UserError(f"--ckpt {ckpt} is a file: give the SR trainer's --workdir (or its checkpoints/ directory).")
    p = plan(cfg, ckpt, step)
    if ckpt is not None and is_trainer_run(ckpt):
        try:
            step_dir, _ = step_directory(ckpt, step)
        except (FileNotFoundError, ValueError) as e:
            raise UserError(f"--ckpt: {e}") from None
        if cfg.model_config and not cfg.allow_config_mismatch:
            check_config_matches(p.model_cfg, step_dir, what="--config.model_config",
                                 override="--config.allow_config_mismatch=True")
    elif ckpt is not None and step is not None:
        raise UserError(f"--step chooses among a training run's checkpoints; --ckpt {ckpt} is a weight source.")
    problem = writable_dir_problem(workdir)
    if problem:
        raise UserError(f"--workdir: {problem}.")


# ------------------------------------------------------------------------------------------------
# The run


def _sampling(cfg: ml_collections.ConfigDict, model_cfg: ml_collections.ConfigDict) -> dict:
    s, m = cfg.sampler, model_cfg.sampler
    return {"sampler": str(s.get("name") or m.name), "steps": int(s.get("steps") or m.steps),
            "shift": float(m.shift if s.get("shift") is None else s.shift)}


def _tiling(cfg: ml_collections.ConfigDict) -> dict:
    tile = tuple(cfg.tile) if isinstance(cfg.tile, tuple | list) else int(cfg.tile)
    return {"tile": tile or None, "overlap": None if cfg.tile_overlap < 0 else int(cfg.tile_overlap)}


def _model_videos(sr, vae, window: Window, hr: np.ndarray, lr: np.ndarray, *, seed: int, sampling: dict,
                  tiling: dict) -> dict[str, np.ndarray]:
    """``model`` and (with anchors) ``model_anchored`` uint8 videos of one window: one layout, one noise."""
    layout = Timeline.from_keyframes(window.length, window.anchors).layout
    key = jax.random.fold_in(jax.random.key(seed), window.index)
    kw = dict(scale=window.scale, key=key, layout=layout, **sampling, **tiling)
    out = {"model": to_uint8(super_resolve(sr, vae, lr, None, **kw))}
    if window.anchors:
        out["model_anchored"] = to_uint8(super_resolve(sr, vae, lr, {f: hr[f] for f in window.anchors}, **kw))
    return out


def _shrink(video: np.ndarray) -> np.ndarray:
    """uint8 frames at most ``SHEET_SIDE`` pixels a side (Pillow box filter) -> [-1, 1] for the contact sheet."""
    h, w = video.shape[1:3]
    f = max(1, math.ceil(max(h, w) / SHEET_SIDE))
    if f > 1:
        video = np.stack([np.asarray(Image.fromarray(x).reduce(f)) for x in video])
    return video.astype(np.float32) / 127.5 - 1.0


def run_vsr_evaluation(cfg: ml_collections.ConfigDict, workdir: str | Path, *, ckpt: str | Path | None = None,
                       baseline: str | None = None, step: int | None = None, progress: bool = True) -> dict:
    """Scores a Director-SR checkpoint (``ckpt``, with bicubic beside it) or ``baseline="bicubic"`` on ``cfg.data``.

    Writes ``metrics.json`` (identical between runs of one config and checkpoint; NaN -> null) and
    ``report.html`` with ``media/`` contact sheets into ``workdir``; returns the metrics (before NaN -> null).
    """
    if (ckpt is None) == (baseline is None):
        raise ValueError("evaluate either a checkpoint (ckpt=DIR) or a baseline (baseline='bicubic'), not both and "
                         "not neither.")
    if baseline is not None and baseline not in BASELINES:
        raise ValueError(f"baseline {baseline!r}; the vsr suite's baselines are {BASELINES}.")
    ckpt = None if ckpt is None else str(ckpt)
    p = plan(cfg, ckpt, step)
    workdir = dir_path(workdir)
    lpips_net = str(cfg.metrics.lpips_net)
    evaluated: dict = {"baseline": baseline}
    sr = vae = None
    if ckpt is not None:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        sr, loaded = load_director_sr(p.model_cfg, ckpt, sharding=one, step=step, weights=cfg.weights,
                                      dtype=cfg.dtype)
        vae = load_frozen_vae(p.model_cfg, sharding=one)
        sampling, tiling = _sampling(cfg, p.model_cfg), _tiling(cfg)
        evaluated = {"checkpoint": loaded.directory, "step": loaded.step, "weights": loaded.weights,
                     "skipped_steps": list(loaded.skipped), "dtype": cfg.dtype, **sampling, **tiling}

    scored: dict[str, dict[str, list]] = {}  # sequence -> method -> per-frame metric dicts (scored frames)
    non_anchor: dict[str, dict[str, list]] = {}  # sequence -> method -> the same on the non-anchor frames
    window_rows, sheets = [], []
    for w in tqdm(p.windows, desc="vsr", unit="window", disable=not progress, dynamic_ncols=True):
        hr, lr = load_window(w)
        videos = {"bicubic": bicubic_upsample(lr, w.scale)}
        if sr is not None:
            videos.update(_model_videos(sr, vae, w, hr, lr, seed=int(cfg.seed), sampling=sampling, tiling=tiling))
        free = np.setdiff1d(np.arange(w.length), w.anchors)
        row = {**w.describe(), "metrics": {}}
        for method, video in videos.items():
            per_frame = frame_metrics(video, hr, crop_border=p.crop_border, lpips_net=lpips_net)
            frames = free if method == "model_anchored" else np.arange(w.length)
            scored.setdefault(w.sequence.name, {}).setdefault(method, []).append(
                {k: v[frames] for k, v in per_frame.items()})
            non_anchor.setdefault(w.sequence.name, {}).setdefault(method, []).append(
                {k: v[free] for k, v in per_frame.items()})
            row["metrics"][method] = mean_frames(per_frame, frames)
        window_rows.append(row)
        if len(sheets) < int(cfg.report.media_cases) and jax.process_index() == 0:
            rows = [(m if m != "model_anchored" else "anchored", _shrink(videos[m])) for m in METHODS if m in videos]
            rows.append(("HR", _shrink(hr)))
            path = contact_sheet(workdir / "media" / f"window_{w.index:04d}.png", rows, marked=w.anchors,
                                 scale=max(1, math.ceil(64 / max(rows[0][1].shape[1:3]))))
            sheets.append((w, path.relative_to(workdir).as_posix()))

    def merged(parts: list[dict]) -> dict:
        return mean_frames({k: np.concatenate([q[k] for q in parts]) for k in METRICS})

    seq_rows = []
    for seq in p.bench.sequences:
        if seq.name not in scored:
            continue
        mine = [w for w in p.windows if w.sequence is seq]
        seq_rows.append({
            "name": seq.name, "hr_size": list(seq.hr_size), "lr_size": list(seq.lr_size),
            "crop_hr": list(mine[0].crop_hr), "lr": "files" if seq.lr is not None else "BI (bicubic downscale)",
            "windows": [w.index for w in mine], "frames": sum(w.length for w in mine),
            "metrics": {m: merged(parts) for m, parts in scored[seq.name].items()},
            "metrics_non_anchor": {m: merged(parts) for m, parts in non_anchor[seq.name].items()}})
    methods = [m for m in METHODS if any(m in r["metrics"] for r in seq_rows)]

    def over_sequences(key: str) -> dict:  # a sequence without anchors in any window has no model_anchored
        return {m: mean_sequences(r[key][m] for r in seq_rows if m in r[key]) for m in methods}

    results = {
        "suite": "vsr",
        "aggregate": over_sequences("metrics"),
        "aggregate_non_anchor": over_sequences("metrics_non_anchor") if any(w.anchors for w in p.windows) else {},
        "sequences": seq_rows, "windows": window_rows, "skipped": p.skipped,
        "settings": {"scale": p.bench.scale, "crop_border": p.crop_border, "frames": p.frames,
                     "min_frames": p.min_frames, "lr_multiple": p.lr_multiple, "anchors": list(cfg.anchors),
                     "lpips_net": lpips_net, "seed": int(cfg.seed), "lr_given": bool(cfg.lr_given),
                     "max_sequences": int(cfg.max_sequences), "max_frames": int(cfg.max_frames),
                     "psnr": "BasicSR: uint8, BT.601 Y (MATLAB rgb2ycbcr, unrounded), crop_border, peak 255",
                     "ssim": "BasicSR: Y channel, 11x11 Gaussian sigma 1.5, valid", "averaging":
                     "mean over a sequence's frames, then over sequences; model_anchored on non-anchor frames"},
        "run": {"data": str(cfg.data), "layout": p.bench.layout, "hr_dir": p.bench.hr_dir, "lr_dir": p.bench.lr_dir,
                "sequences": [s.name for s in p.bench.sequences], "evaluated": evaluated,
                "model_config": str(cfg.model_config or (f"{ckpt} (its recorded config)" if ckpt else ""))},
    }
    if jax.process_index() == 0:
        write_metrics(workdir, results)
        title = (f"Director-SR step {evaluated['step']} ({evaluated['weights']})" if ckpt else "bicubic baseline")
        write_vsr_report(workdir, results, sheets, title=title)
    return results


# ------------------------------------------------------------------------------------------------
# report.html


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return str(x) if isinstance(x, int) else (f"{x:.4f}" if abs(x) < 10 else f"{x:.2f}")


def _table(aggregate: dict) -> str:
    head = "".join(f"<th>{k} ({BETTER[k]} is better)</th>" for k in METRICS)
    rows = "".join(f"<tr><td>{html.escape(m)}</td>" + "".join(f"<td>{_fmt(v.get(k))}</td>" for k in METRICS)
                   + f"<td>{v.get('frames')}</td></tr>\n" for m, v in aggregate.items())
    return f"<table><tr><th>method</th>{head}<th>frames</th></tr>\n{rows}</table>"


def write_vsr_report(workdir: Path, results: dict, sheets: list[tuple[Window, str]], *, title: str) -> Path:
    """``report.html``: methods x metrics (all frames / non-anchor frames), per sequence, skipped, contact sheets."""
    s = results["settings"]
    per_seq = "".join(f"<h3>{html.escape(r['name'])}</h3><p>{r['frames']} frames, HR {r['hr_size'][1]}x"
                      f"{r['hr_size'][0]} cropped to {r['crop_hr'][3]}x{r['crop_hr'][2]}, LR {html.escape(r['lr'])}"
                      f"</p>{_table(r['metrics'])}" for r in results["sequences"])
    skipped = "".join(f"<li>{html.escape(k['sequence'])} frames {k['start']}..{k['start'] + k['frames'] - 1}: "
                      f"{html.escape(k['reason'])}</li>" for k in results["skipped"]) or "<li>nothing</li>"
    figures = "".join(f"<h3>window {w.index}: {html.escape(w.sequence.name)} frames {w.start}.."
                      f"{w.start + w.length - 1}</h3><img src='{p}'>" for w, p in sheets)
    non_anchor = results["aggregate_non_anchor"]
    page = f"""<!doctype html><meta charset="utf-8"><title>{html.escape(title)}: VSR evaluation</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto;background:#fafafa}}
td,th{{padding:3px 8px;border-bottom:1px solid #ddd;font-size:90%}} img{{max-width:100%}}</style>
<h1>VSR evaluation: {html.escape(title)}</h1>
<p>Data {html.escape(results['run']['data'])} (layout {results['run']['layout']}), {s['scale']}x, windows of
{s['frames'] or 'whole sequences'} frames, anchors {html.escape(json.dumps(s['anchors']))}. PSNR-Y / SSIM-Y as
BasicSR (BT.601 luma, {s['crop_border']} border pixels cropped), PSNR-RGB with the same crop, LPIPS
({html.escape(s['lpips_net'] or 'off')}) on whole RGB frames; the mean over a sequence's frames, then over
sequences. <b>model_anchored is scored on its non-anchor frames</b> (the anchors are the true frames).</p>
<h2>Summary</h2>{_table(results['aggregate'])}
{'<h2>Non-anchor frames only (every method)</h2>' + _table(non_anchor) if non_anchor else ''}
<h2>Per sequence</h2>{per_seq}
<h2>Skipped</h2><ul>{skipped}</ul>
<h2>Contact sheets</h2><p>Rows: bicubic, model, anchored (yellow: anchor frames), HR.</p>{figures}
"""
    return atomic_write_text(workdir / "report.html", page)
