"""Curation as an Apache Beam pipeline: the same per-source work, on a runner's workers instead of one process.

``python -m director_jax.curate --runner direct --workers N`` (or ``curate(..., runner=BeamRun(...))``)
turns the sources still to do into a ``PCollection``; each worker process builds its own captioner
(``DoFn.setup``, from the run's ``config.caption``) and curates a source at a time with
``candidate.curate_candidate``, which records the source in the output directory itself, under its commit
lock: a run killed at any point keeps every source a worker finished, and a rerun does the rest, as with
the in-process loop. Per-element failures of a video are skips (``skipped.jsonl``), never fatal; the
per-source counts come back to the driver, which merges them into ``summary.json``.

The runner is Beam's ``DirectRunner``: ``multi_processing`` with ``--workers`` processes, or in this
process (``in_memory``) for one. Outputs equal the in-process command's (the same samples and cut frames;
line order follows completion; clips equal up to the H.264 encoder, whose bytes differ from run to run even in
one process). Running on Dataflow, Flink or Spark needs the output directory's
appends and locks on a shared filesystem, which object stores (gs://) do not give: not supported yet.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from director_jax.curation.candidate import curate_candidate
from director_jax.curation.inputs import Candidate
from director_jax.curation.outdir import CAPTION_CACHE, OutputDir
from director_jax.curation.source import CurationSettings

RUNNERS = ("direct",)


@dataclasses.dataclass(frozen=True)
class BeamRun:
    """A Beam run of the curation: the runner and its worker processes."""

    runner: str = "direct"
    workers: int = 1

    def __post_init__(self) -> None:
        if self.runner not in RUNNERS:
            raise ValueError(f"--runner {self.runner!r}: choose one of {', '.join(RUNNERS)}.")
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"--workers {self.workers!r}: give a whole number >= 1.")

    def options(self) -> PipelineOptions:
        mode = "multi_processing" if self.workers > 1 else "in_memory"
        # the worker processes log on their own: errors only, unless the command runs with --verbose (Beam's
        # own start-up warnings of a local run are chatter)
        level = "INFO" if logging.getLogger("apache_beam").isEnabledFor(logging.INFO) else "ERROR"
        return PipelineOptions(["--direct_num_workers", str(self.workers), "--direct_running_mode", mode,
                                "--default_sdk_harness_log_level", level])


class CurateSource(beam.DoFn):
    """One source per element, curated and recorded by this worker (see the module doc)."""

    def __init__(self, root: str, settings: CurationSettings, make_captioner: Callable[[], Any]):
        self.root, self.settings, self.make_captioner = root, settings, make_captioner

    def setup(self) -> None:
        self.out = OutputDir(self.root)
        self.captioner = self.make_captioner()
        for c in (self.captioner, getattr(self.captioner, "primary", None)):
            if hasattr(c, "use_cache"):
                c.use_cache(Path(self.root) / CAPTION_CACHE)

    def process(self, candidate: Candidate) -> Iterator[str]:
        yield json.dumps(curate_candidate(candidate, self.out, self.settings, self.captioner, progress=False))

    def teardown(self) -> None:
        close = getattr(getattr(self, "captioner", None), "close", None)
        if close is not None:
            close()


def run_beam(candidates: list[Candidate], out: OutputDir, settings: CurationSettings, run: BeamRun,
             make_captioner: Callable[[], Any]) -> list[dict[str, Any]]:
    """Curates ``candidates`` on ``run``'s runner into ``out`` (already recovered); the per-candidate counts.
    ``make_captioner`` (picklable: it travels to the workers) builds each worker's captioner."""
    beam_log = logging.getLogger("apache_beam")
    if not beam_log.isEnabledFor(logging.INFO):  # not --verbose: the relayed worker warnings are chatter too
        beam_log.setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(dir=out.root, prefix=".beam-") as tmp:
        prefix = str(Path(tmp) / "counts")
        with beam.Pipeline(runner="DirectRunner", options=run.options()) as p:
            _ = (p | "sources" >> beam.Create(candidates)
                 | "spread" >> beam.Reshuffle()
                 | "curate" >> beam.ParDo(CurateSource(str(out.root), settings, make_captioner))
                 | "counts" >> beam.io.WriteToText(prefix))
        counts = [json.loads(line) for f in sorted(Path(tmp).glob("counts*")) for line in f.read_text().splitlines()
                  if line.strip()]
    return counts
