"""Where the CPU demo's trajectory error comes from: the VAE's round trip, its latent space, and Gen's sampler.

    python benchmarks/demo_latents.py --workdir runs/demo              # after bash scripts/demo.sh
    python benchmarks/demo_latents.py --workdir runs/demo --movies 4   # faster (the demo evaluates 16)

On the held-out suite of the demo's evaluation (``configs/eval_synthetic.py``, same movies and
seeds), with the demo's VAE (``WORKDIR/vae``) and Director-Gen (``WORKDIR/gen``):

1. **VAE round trip**: the true clips encoded over each case's timeline and decoded; the trajectory
   error of that is the floor of any generated video (the cross-fade baseline is beside it).
2. **Latent copyability**: per case timeline, the mean squared difference between each generated
   latent frame of the true clip and the nearest given (keyframe) latent, against the variance of
   those latents. Below 1x, a keyframe's latent predicts its neighbours; a VAE whose later
   latents code the chunk's history instead (random 3D kernels) measured above 1x, and Gen had
   nothing to carry over from its keyframes.
3. **Gen**: the trajectory error of Gen's one-step estimate of the clean latents from pure noise
   (the conditional mean: blurry, but where the model thinks the objects are) and of the sampler
   at the demo's step count, at each keyframe-guidance scale of ``--keyframe-guidance``. A sampler
   result much worse than the one-step estimate means the model's samples, not its idea of the
   motion, are what fail.
4. **Position oracles** (no video, the true centres only): the error of an object held at the
   nearest keyframe's position (a generator that copies its keyframes perfectly) and of one moved
   linearly between the keyframes' positions (perfect interpolation; bounces off the frame edge
   are what is left). Across a cut each shot holds its own keyframe's position.

Prints a markdown table (stdout).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from bench_common import REPO, machine_description, make_log

log = make_log("demo-latents")


def position_oracles(centers: np.ndarray, keyframes, cuts) -> tuple[np.ndarray, np.ndarray]:
    """(T, 2) positions: held at the nearest keyframe's, and moved linearly between keyframes (per shot)."""
    keyframes = sorted(keyframes)
    hold, linear = np.empty_like(centers), np.empty_like(centers)
    for t in range(len(centers)):
        after = [k for k in keyframes if k >= t]
        before = [k for k in keyframes if k <= t]
        a = before[-1] if before else after[0]
        b = after[0] if after else before[-1]
        cut = next((c for c in cuts if a < c <= b), None)
        if cut is not None:  # another shot: each side keeps its own shot's keyframe
            a = b = a if t < cut else b
        w = 0.0 if a == b else (t - a) / (b - a)
        hold[t] = centers[a] if w < 0.5 else centers[b]
        linear[t] = (1 - w) * centers[a] + w * centers[b]
    return hold, linear


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=str(REPO / "runs" / "demo"), help="a CPU demo run (vae/, gen/)")
    parser.add_argument("--movies", type=int, default=16, help="held-out movies (3 cases each; the demo's 16)")
    parser.add_argument("--keyframe-guidance", default="1",
                        help="comma-separated keyframe-guidance scales for the sampler rows (the config's is added)")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp

    from director_jax.build import load_director_gen, load_frozen_vae
    from director_jax.configs_common import load_config
    from director_jax.eval.baselines import crossfade
    from director_jax.eval.generate import case_key
    from director_jax.eval.run import build_cases, eval_sampling
    from director_jax.eval.trajectory import trajectory_error
    from director_jax.models.multichunk import decode_timeline
    from director_jax.models.timeline import Timeline, place_given_frames
    from director_jax.models.vae import denormalize_latents
    from director_jax.pipeline.codec import jitted_codec
    from director_jax.pipeline.gen import generate_latents, timeline_latents

    t0 = time.perf_counter()
    workdir = Path(args.workdir)
    model_cfg = load_config(workdir / "gen" / "config.py")
    ecfg = load_config(REPO / "configs" / "eval_synthetic.py")
    ecfg.movies.count = args.movies
    cases = build_cases(ecfg, model_cfg)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    gen, _ = load_director_gen(model_cfg, workdir / "gen", sharding=sharding)
    vae = load_frozen_vae(model_cfg, sharding=sharding)
    encode, decode = jitted_codec(vae)
    settings = eval_sampling(ecfg, model_cfg)
    scales = sorted({float(s) for s in args.keyframe_guidance.split(",") if s} | {settings.keyframe_guidance})
    text = jnp.zeros((1, 1, int(model_cfg.model.text_dim)), jnp.float32)
    text_mask = jnp.zeros((1, 1), bool)

    rows: dict = {k: [] for k in ("roundtrip", "crossfade", "onestep", "copy", "var", "hold", "linear")}
    rows.update({("sampler", s): [] for s in scales})
    for case in cases:
        layout = Timeline.from_keyframes(case.num_frames, case.keyframes).layout
        generated = [t for t in range(case.num_frames) if t not in case.keyframes]
        given = np.asarray(layout.given)

        def score(latents, layout=layout, case=case, generated=generated):
            video = decode_timeline(vae, denormalize_latents(latents, vae.config), layout, decode=decode)
            return trajectory_error(np.clip(np.asarray(video)[0], -1, 1), case.truth, generated)

        truth = timeline_latents(vae, jnp.asarray(case.reference[None]), layout, encode=encode)
        rows["roundtrip"].append(score(truth))
        rows["crossfade"].append(trajectory_error(crossfade(case.reference, case.keyframes), case.truth, generated))
        z = np.asarray(truth)[0]
        given_idx, gen_idx = np.flatnonzero(given), np.flatnonzero(~given)
        nearest = given_idx[np.argmin(np.abs(given_idx[None] - gen_idx[:, None]), axis=1)]
        rows["copy"].append(float(np.mean((z[gen_idx] - z[nearest]) ** 2)))
        rows["var"].append(float(np.var(z[gen_idx])))

        keyframes = jnp.asarray(place_given_frames(case.num_frames, {k: case.reference[k] for k in case.keyframes}))
        given_latents = timeline_latents(vae, keyframes[None], layout, encode=encode)
        key = case_key(int(ecfg.seed), case.index)  # evaluate's noise: the sampler row is its number
        mask = jnp.asarray(given)[None]
        x = jnp.where(mask[..., None, None, None], given_latents, jax.random.normal(key, given_latents.shape))
        sigma = jnp.where(mask, 0.0, 1.0)
        velocity = gen(x, sigma, text, positions=jnp.asarray(layout.position), text_mask=text_mask)
        rows["onestep"].append(score(x - sigma[..., None, None, None] * velocity))
        for s in scales:
            sampled = generate_latents(gen, layout, given_latents, text, key=key, text_mask=text_mask,
                                       steps=settings.steps, sampler=settings.sampler, shift=settings.shift,
                                       keyframe_guidance=s, progress=False)
            rows[("sampler", s)].append(score(sampled))
        hold, linear = position_oracles(case.truth.centers[:, 0], case.keyframes, case.cuts)
        rows["hold"].append(float(np.mean(np.hypot(*(hold - case.truth.centers[:, 0])[generated].T))))
        rows["linear"].append(float(np.mean(np.hypot(*(linear - case.truth.centers[:, 0])[generated].T))))
        log(f"case {case.index + 1}/{len(cases)}")

    def traj(name) -> str:
        err = np.mean([r["trajectory_error_px"] for r in rows[name]])
        missing = np.mean([r["object_missing_fraction"] for r in rows[name]])
        return f"{err:.2f} | {missing:.3f}"

    print(f"\n## Demo latents: `python benchmarks/demo_latents.py --workdir {args.workdir} --movies {args.movies}`\n")
    print("\n".join(machine_description("benchmarks/demo_latents.py", ("director_jax", "configs"))))
    print(f"\n{len(cases)} held-out cases; {time.perf_counter() - t0:.0f} s.\n")
    print("| video | trajectory error (px) | objects missing |\n|---|---|---|")
    print(f"| VAE round trip of the true clip | {traj('roundtrip')} |")
    print(f"| cross-fade between the keyframes | {traj('crossfade')} |")
    print(f"| Gen, one-step clean estimate from noise | {traj('onestep')} |")
    for s in scales:
        mark = " (the demo's)" if s == settings.keyframe_guidance else ""
        print(f"| Gen, {settings.sampler} {settings.steps} steps, keyframe guidance {s:g}{mark} | "
              f"{traj(('sampler', s))} |")
    print(f"| position oracle: held at the nearest keyframe's position | {np.mean(rows['hold']):.2f} | |")
    print(f"| position oracle: moved linearly between keyframes | {np.mean(rows['linear']):.2f} | |")
    ratio = np.mean(rows["copy"]) / np.mean(rows["var"])
    print(f"\nLatent copyability: nearest-keyframe latent MSE {np.mean(rows['copy']):.3f} vs variance "
          f"{np.mean(rows['var']):.3f} of the generated latents ({ratio:.2f}x).")


if __name__ == "__main__":
    main()
