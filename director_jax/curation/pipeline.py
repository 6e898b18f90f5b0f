"""Movie curation: input files -> shots -> filtered shots -> samples -> H.264 clips + captions + manifest.

``curate(inputs, out_dir, cfg)`` (the ``python -m director_jax.curate`` command) writes the layout of
the data contract (``OUT/shots.jsonl``, ``manifest.jsonl``, ``skipped.jsonl``, ``clips/``,
``summary.json``; with a VLM captioner also ``caption_cache.jsonl``, its answers, so a rerun pays for
none twice): the inputs are walked (``director_jax.curation.inputs``), each source not yet done is
curated (``director_jax.curation.source``: two streaming decodes, the clips and their captions) and
recorded (``director_jax.curation.outdir``: crash safety and resume), and the run's counts go to
``summary.json``.

Before anything is written the inputs are walked: when none of them is a video to try (all
missing, or directories without a file of a video extension) the run is refused (``UserError``)
and no output directory is created. One run at a time writes an output directory: it holds an
exclusive ``flock`` on ``OUT/.lock`` (``outdir.lock_output``) from before recovery to the summary;
a second run is refused, and the kernel drops the lock when a run exits or is killed.

A rerun drops whatever a crash left half written, then does only the sources not yet done or
skipped. A file whose name is not valid UTF-8 is curated like any other; its records carry its
name with the bad bytes escaped (``\\xNN``) and, in shots.jsonl / skipped.jsonl, the exact bytes
(``source_bytes``, hex). A file that cannot be read as a video is skipped with a reason (skipped.jsonl); a captioner
failure stops the run (a rerun resumes), since it is usually a server or configuration problem that
would otherwise skip everything (``caption.fallback`` makes failed captions fall back instead).
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from director_jax.curation.candidate import curate_candidate, merge_counts
from director_jax.curation.captioners import make_captioner
from director_jax.curation.inputs import Candidate, display_path, split_inputs, walk_inputs
from director_jax.curation.outdir import CAPTION_CACHE, SUMMARY, OutputDir, lock_output
from director_jax.curation.source import CurationSettings
from director_jax.errors import UserError
from director_jax.io_utils import atomic_write_text

if TYPE_CHECKING:
    from director_jax.curation.beam_pipeline import BeamRun

log = logging.getLogger(__name__)


def build_captioner(caption_cfg):
    """The captioner ``config.caption`` names, with that kind's options."""
    kind = caption_cfg.kind
    options: dict[str, Any] = {}
    if kind == "openai":
        options = caption_cfg.openai.to_dict()
        if not options.get("model"):
            raise ValueError("config.caption.kind=openai needs --config.caption.openai.model "
                             "(the served model's name).")
        if not options.get("api_key_env"):
            options.pop("api_key_env", None)
    elif kind == "jsonl":
        options = caption_cfg.jsonl.to_dict()
        if not options.get("path"):
            raise ValueError("config.caption.kind=jsonl needs --config.caption.jsonl.path (the captions file).")
    if caption_cfg.fallback:
        options["fallback"] = caption_cfg.fallback
    return make_captioner(kind, **options)


def plan_inputs(inputs: Sequence[str], out_dir: str | os.PathLike, extensions: frozenset[str]) -> list[Candidate]:
    """The inputs walked (``curation.inputs``), one candidate per source; ``UserError`` when none is a video to try.

    Reads no video and writes nothing: the check the command makes before it creates ``out_dir``.
    """
    paths = split_inputs(inputs)
    if not paths:
        raise UserError("--input names no file or directory (give video files or directories).")
    candidates = list({c.source: c for c in walk_inputs(paths, extensions, exclude=Path(out_dir))}.values())
    if any(c.reason is None for c in candidates):
        return candidates
    shown = ", ".join(display_path(p) for p in paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
    if candidates and all(c.reason == "missing" for c in candidates):
        raise UserError(f"no such file or directory: {shown} (--input takes video files and directories).")
    reasons = collections.Counter(c.reason for c in candidates)
    found = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())) or "no files at all"
    raise UserError(f"no video to curate in {shown}: {found} (video extensions: config.inputs.extensions = "
                    f"{', '.join(sorted(extensions))}).")


def curate(inputs: Sequence[str], out_dir: str | os.PathLike, cfg, *, captioner=None,
           progress: bool | None = None, runner: BeamRun | None = None) -> dict:
    """Curates ``inputs`` (files and directories) into ``out_dir``; returns (and writes) the run's summary.

    Raises ``UserError`` before writing anything when the config is out of range, no input is a
    video to try, or another run holds ``out_dir``'s lock. ``runner`` (``beam_pipeline.BeamRun``) curates the
    sources as an Apache Beam pipeline on that runner instead of one after another in this process.
    """
    t0 = time.perf_counter()
    try:
        settings = CurationSettings.from_config(cfg)
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from e
    candidates = plan_inputs(inputs, out_dir, settings.extensions)
    if captioner is None:
        try:
            captioner = build_captioner(cfg.caption)
        except (ValueError, TypeError) as e:
            raise UserError(str(e)) from e
    progress = bool(cfg.get("progress", True)) if progress is None else progress
    with lock_output(out_dir):
        make_captioner = functools.partial(build_captioner, cfg.caption)  # for the workers of a Beam run
        return _curate_locked(candidates, out_dir, settings, captioner, progress, t0, runner, make_captioner)


def _vlm_client(captioner):
    """The VLM captioner's ``ChatClient`` (inside a fallback too), or None for captioners that call no server."""
    for c in (captioner, getattr(captioner, "primary", None)):
        if hasattr(c, "use_cache"):
            return c
    return None


def _curate_locked(candidates: list[Candidate], out_dir, settings: CurationSettings, captioner, progress: bool,
                   t0: float, runner: BeamRun | None = None, make_captioner=None) -> dict:
    out = OutputDir(out_dir)
    recovered = out.recover()
    vlm = _vlm_client(captioner)
    if vlm is not None:  # answers kept: a rerun (after a crash, say) asks the server only what it never answered
        vlm.use_cache(out.root / CAPTION_CACHE)
    if any(recovered.values()):
        log.info("recovered %s: %s", out.root, recovered)
    summary: dict[str, Any] = {
        "sources": {"seen": len(candidates), "done": 0, "skipped": {}, "already_done": 0, "already_skipped": 0},
        "shots": {"kept": 0, "dropped": {}},
        "samples": {"single_shot": 0, "multi_shot": 0, "total": 0},
        "frames": 0, "frames_decoded": 0, "seconds": 0.0, "frames_per_second": 0.0,
        "max_open_samples": 0, "max_caption_frames": 0, "recovered": recovered,
    }
    src, shot_counts = summary["sources"], summary["shots"]
    if runner is not None:  # the Beam workers build their own captioners (one per worker process)
        vlm = None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(candidates), unit="source", desc="curate", position=0, dynamic_ncols=True)
    try:
        todo = [c for c in candidates if c.reason is None and c.source not in out.done | out.skipped.keys()]
        if runner is not None and todo:
            from director_jax.curation.beam_pipeline import run_beam  # apache-beam only for a --runner run

            for delta in run_beam(todo, out, settings, runner, make_captioner):
                merge_counts(summary, delta)
            if bar is not None:
                bar.update(len(todo))
            out.recover()  # this process's view of what the workers recorded (nothing to repair after a clean run)
            done_by_beam = {c.source for c in todo}
            candidates = [c for c in candidates if c.source not in done_by_beam]  # the rest: counted or skipped
        for c in candidates:
            merge_counts(summary, curate_candidate(c, out, settings, captioner, progress))
            if bar is not None:
                bar.update(1)
                seconds = time.perf_counter() - t0
                bar.set_postfix(frames=summary["frames"], fps=f"{summary['frames'] / max(seconds, 1e-9):.0f}",
                                samples=summary["samples"]["total"])
    finally:
        if bar is not None:
            bar.close()
        if vlm is not None:
            vlm.close()
            summary["caption_requests"] = {"sent": vlm.client.calls, "from_cache": vlm.client.cache.hits}
        seconds = time.perf_counter() - t0
        summary["seconds"] = round(seconds, 3)
        summary["frames_per_second"] = round(summary["frames"] / max(seconds, 1e-9), 1)
        summary["output"] = {"sources_done": len(out.done), "sources_skipped": len(out.skipped),
                             "samples": out.num_samples}
        src["skipped"] = dict(sorted(src["skipped"].items()))
        shot_counts["dropped"] = dict(sorted(shot_counts["dropped"].items()))
        atomic_write_text(out.root / SUMMARY, json.dumps(summary, indent=2) + "\n")
    return summary


def format_summary(summary: dict, out_dir: str | os.PathLike) -> str:
    """The summary as the few lines the command prints at the end."""
    s, sh, sa = summary["sources"], summary["shots"], summary["samples"]
    skipped = ", ".join(f"{k} {v}" for k, v in s["skipped"].items()) or "none"
    dropped = ", ".join(f"{k} {v}" for k, v in sh["dropped"].items()) or "none"
    o = summary["output"]
    return "\n".join([
        f"sources: {s['seen']} seen, {s['done']} curated, {sum(s['skipped'].values())} skipped ({skipped}), "
        f"{s['already_done']} already done, {s['already_skipped']} already skipped",
        f"shots: {sh['kept']} kept, {sum(sh['dropped'].values())} dropped ({dropped})",
        f"samples: {sa['total']} ({sa['single_shot']} single-shot, {sa['multi_shot']} multi-shot)",
        f"frames: {summary['frames']} in {summary['seconds']:.1f} s ({summary['frames_per_second']:.0f} frames/s)",
        f"{out_dir}: {o['sources_done']} sources done, {o['sources_skipped']} skipped, {o['samples']} samples",
        *([f"caption requests: {r['sent']} sent, {r['from_cache']} answered from {CAPTION_CACHE}"]
          if (r := summary.get("caption_requests")) else []),
    ])
