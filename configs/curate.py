"""Movie curation: shots, filters, single- and multi-shot samples, H.264 clips and captions.

    python -m director_jax.curate --input /movies --out curated/
    python -m director_jax.curate --config configs/curate.py --input a.mp4,b.mkv --input more/ --out curated/ \\
        --config.caption.kind openai --config.caption.openai.url http://127.0.0.1:8000/v1 \\
        --config.caption.openai.model Qwen/Qwen2.5-VL-7B-Instruct --config.caption.fallback template

Without --config this file is the default. Rerunning with the same --out resumes: sources already
in shots.jsonl (done) or skipped.jsonl (skipped) are not processed again. Frame counts are at the
source's frame rate; luma values are 0..255 on the analysis frames (at most shots.analysis_width
wide). The default lengths suit 24-30 fps films: single-shot samples of up to ~5 s, multi-shot
samples of up to ~10 s whose first and last shots contribute at most ~3 s each.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Files taken from walked directories (files named on the command line are always tried).
    c.inputs = ml_collections.ConfigDict(dict(
        extensions=("mp4", "mkv", "mov", "avi", "webm", "m4v", "mpg", "mpeg", "ts", "m2ts", "wmv", "flv", "ogv"),
    ))
    # Shot detection (PySceneDetect): detector "content" | "adaptive" | "histogram".
    c.shots = ml_collections.ConfigDict(dict(
        detector="content",
        content_threshold=27.0,
        adaptive_threshold=3.0,
        adaptive_min_content_val=15.0,
        adaptive_window=2,
        histogram_threshold=0.1,
        histogram_bins=256,
        min_scene_frames=4,
        analysis_width=256,
    ))
    # Shot filters; a dropped shot is listed in shots.jsonl with its reason.
    c.filters = ml_collections.ConfigDict(dict(
        min_shot_frames=8,  # too_short below this
        black_luma=16.0,  # black: mean luma below
        fade_dark_luma=24.0,  # fading: one end's mean luma below this ...
        fade_min_change=40.0,  # ... and the other end this much brighter
        fade_window=3,  # frames averaged at each end
        # static: in the median frame at most static_changed_fraction of the pixels changed by more than
        # static_pixel_delta luma levels over static_gap frames (grain and codec noise touch every pixel a
        # little, a moving object a few pixels a lot)
        static_pixel_delta=12.0,
        static_changed_fraction=0.002,
        static_gap=4,
    ))
    c.single_shot = ml_collections.ConfigDict(dict(enabled=True, min_frames=16, max_frames=121))
    c.multi_shot = ml_collections.ConfigDict(dict(
        enabled=True,
        max_shots=3,
        min_frames=24,
        max_frames=241,
        max_edge_frames=72,  # first/last shot trimmed to this many frames next to the cut (0: whole shots)
        overlapping=True,  # every run of 2..max_shots adjacent shots (False: disjoint runs)
    ))
    c.keyframes = ml_collections.ConfigDict(dict(num_even=5, num_motion_peaks=3, min_peak_distance=4))
    # Stored clips: H.264, resized so the short side <= max_short_side.
    c.clip = ml_collections.ConfigDict(dict(max_short_side=480, crf=18, preset="medium"))
    # Captions: kind "template" | "openai" | "jsonl"; fallback "" or a kind used when the first fails.
    c.caption = ml_collections.ConfigDict(dict(
        kind="template",
        fallback="",
        frames_per_shot=3,  # frames sampled evenly from each shot of a sample for the captioner
        openai=ml_collections.ConfigDict(dict(
            url="http://127.0.0.1:8000/v1", model="", api_key_env="", timeout_s=60.0, retries=3, backoff_s=1.0,
            max_image_side=512, max_tokens=1024, temperature=0.2,
            # per curation worker: requests started per second (0: no limit) and requests in flight at once
            max_requests_per_s=0.0, concurrency=1)),
        jsonl=ml_collections.ConfigDict(dict(path="")),
    ))
    c.progress = True
    return c
