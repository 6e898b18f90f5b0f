"""One candidate of a curation run: curated (or skipped), recorded in the output directory, counted.

Shared by the in-process loop (``pipeline.py``) and the Beam pipeline's workers (``beam_pipeline.py``): each
call records its source itself (``OutputDir.add_source`` / ``add_skipped``, under the directory's commit lock),
so a run killed at any point keeps every source finished before, whoever curated it; the counts it returns
are merged into the run's ``summary.json`` (``merge_counts``).
"""

from __future__ import annotations

import collections
import logging

from director_jax.curation import decode
from director_jax.curation.inputs import Candidate, display_path
from director_jax.curation.outdir import OutputDir
from director_jax.curation.source import CurationSettings, curate_source

log = logging.getLogger(__name__)


def curate_candidate(c: Candidate, out: OutputDir, settings: CurationSettings, captioner, progress: bool) -> dict:
    """One candidate curated (or skipped) and recorded in ``out``; the counts it adds to the run's summary."""
    if c.source in out.done:
        return {"sources": {"already_done": 1}}
    if c.source in out.skipped:
        return {"sources": {"already_skipped": 1}}
    if c.reason is not None:
        return _skip(out, c, c.reason, c.detail)
    spool = out.spool()
    try:
        result = curate_source(c.path, c.source, settings, captioner, out.clips, spool, progress)
    except decode.VideoReadError as e:
        spool.unlink(missing_ok=True)
        return _skip(out, c, e.reason, e.detail)
    except BaseException:
        spool.unlink(missing_ok=True)
        raise
    if c.source_bytes is not None:
        result.shots_line["source_bytes"] = c.source_bytes
    out.add_source(result.shots_line, spool, sum(result.samples.values()))
    log.info("%s: %d frames, %d shots (%d kept), %d samples", c.source, result.shots_line["num_frames"],
             len(result.verdicts), len(result.shots_line["kept_shots"]), sum(result.samples.values()))
    dropped = collections.Counter(v.reason for v in result.verdicts if v.reason is not None)
    samples = dict(result.samples)
    return {"sources": {"done": 1}, "shots": {"kept": sum(v.reason is None for v in result.verdicts),
                                              "dropped": dict(dropped)},
            "samples": {**samples, "total": sum(samples.values())}, "frames": result.shots_line["num_frames"],
            "frames_decoded": result.frames_decoded, "max_open_samples": result.max_open_samples,
            "max_caption_frames": result.max_caption_frames}


def _skip(out: OutputDir, c: Candidate, reason: str, detail: str) -> dict:
    detail = display_path(detail) if detail else ""  # an FFmpeg message may quote a name that is not UTF-8
    log.warning("skipping %s: %s%s", c.source, reason, f" ({detail})" if detail else "")
    out.add_skipped(c.source, reason, c.source_bytes)
    return {"sources": {"skipped": {reason: 1}}}


def merge_counts(summary: dict, delta: dict) -> None:
    """Adds a candidate's counts into the summary: numbers summed (``max_*`` keys: the larger), dicts merged."""
    for key, value in delta.items():
        if isinstance(value, dict):
            merge_counts(summary.setdefault(key, {}), value)
        elif key.startswith("max_"):
            summary[key] = max(summary.get(key, 0), value)
        else:
            summary[key] = summary.get(key, 0) + value
