"""Samplers for flow models: Euler and UniPC, with given latent frames held clean and text CFG.

Both follow diffusers step for step, so a model converted from a diffusers pipeline samples the
same here (checked in ``tests/test_diffusion_samplers.py``):

* ``euler_sigmas`` is ``FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=s)``'s
  table after ``set_timesteps(n)``, ``euler_step`` its ``step``. Quirk kept on purpose: the
  scheduler shifts its training table at construction and then shifts the inference table again
  between the shifted end points, so the last non-zero sigma is ``shift(shift(1/1000))`` (0.0244
  for shift 5 and 4 steps, not 0.005). ``dynamic_shifting=True`` is the Flux-style scheduler
  (``use_dynamic_shifting=True``, ``mu = log(shift)``), which shifts once.
* ``unipc_sigmas`` / ``UniPCSolver`` are ``UniPCMultistepScheduler(prediction_type=
  "flow_prediction", use_flow_sigmas=True, flow_shift=s, solver_order=2, solver_type="bh2",
  lower_order_final=True)`` (the Wan pipelines' scheduler): the first sigma is ``1 - 1e-6`` (the
  log-SNR is -inf at 1), the last is 0, and the predictor of the final step returns the x0
  prediction.

Where diffusers returns non-finite samples we return the finite limit instead (documented at
``UniPCSolver``). The per-step coefficients are computed in float64 on the host from the float32
sigma table; the updates run in the samples' dtype (float32 in ``sample``).

The model timesteps diffusers feeds to Wan differ slightly: Euler passes ``sigma * 1000``, UniPC
``int64(sigma * 1000)`` (truncated). ``sample`` hands the model the exact sigma per latent frame;
a ``denoise_fn`` that wants diffusers' integer timesteps can floor ``sigma * 1000`` itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from director_jax.diffusion.timesteps import shift_sigmas

NUM_TRAIN_TIMESTEPS = 1000
SAMPLERS = ("unipc", "euler")
_UNIPC_SIGMA_EPS = 1e-6  # diffusers moves a first flow sigma of 1 to 1 - 1e-6

Array = Any  # a jax.Array or a np.ndarray: the solvers are written for both (tests run them in float64 NumPy)


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1 (the number of model calls), got {steps!r}.")


def euler_sigmas(steps: int, shift: float = 1.0, *, dynamic_shifting: bool = False,
                 num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """diffusers' ``FlowMatchEulerDiscreteScheduler`` sigmas after ``set_timesteps(steps)``: steps + 1, ending in 0.

    ``dynamic_shifting=False``: ``FlowMatchEulerDiscreteScheduler(num_train_timesteps, shift=shift)``
    (end points shifted twice, see the module docstring). ``dynamic_shifting=True``: the scheduler
    with ``use_dynamic_shifting=True`` and ``set_timesteps(steps, mu=log(shift))``.
    """
    _check_steps(steps)
    n = num_train_timesteps
    # The training table, in float32 as the scheduler builds it with torch.
    train = np.linspace(1, n, n, dtype=np.float32)[::-1] / np.float32(n)
    if not dynamic_shifting:
        train = (np.float32(shift) * train / (np.float32(1) + np.float32(shift - 1) * train)).astype(np.float32)
    sigma_max, sigma_min = float(train[0]), float(train[-1])
    sigmas = np.linspace(sigma_max * n, sigma_min * n, steps) / n
    sigmas = shift_sigmas(sigmas, shift)
    return np.append(sigmas, 0.0).astype(np.float32)


def unipc_sigmas(steps: int, shift: float = 1.0, *, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """diffusers' ``UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=shift)`` sigmas: steps + 1, ending in 0.

    ``linspace(1, 1/num_train_timesteps, steps + 1)[:-1]`` shifted, a first value of 1 moved to
    ``1 - 1e-6``, then 0 appended (``final_sigmas_type="zero"``). Dynamic shifting with ``mu`` is
    the same table with ``shift = exp(mu)``.
    """
    _check_steps(steps)
    sigmas = shift_sigmas(np.linspace(1.0, 1.0 / num_train_timesteps, steps + 1)[:-1], shift)
    if abs(sigmas[0] - 1.0) < _UNIPC_SIGMA_EPS:
        sigmas[0] -= _UNIPC_SIGMA_EPS
    return np.append(sigmas, 0.0).astype(np.float32)


def sampler_sigmas(sampler: str, steps: int, shift: float = 1.0) -> np.ndarray:
    """The sigma table (steps + 1 values, last 0) that ``sample`` uses for ``sampler``."""
    if sampler == "unipc":
        return unipc_sigmas(steps, shift)
    if sampler == "euler":
        return euler_sigmas(steps, shift)
    raise ValueError(f"unknown sampler {sampler!r}: use one of {SAMPLERS}.")


@jax.jit
def _lincomb_jax(coeffs: jax.Array, arrays: tuple[jax.Array, ...]) -> jax.Array:
    out = sum(coeffs[i] * a.astype(jnp.float32) for i, a in enumerate(arrays))
    return out.astype(arrays[0].dtype)


def _lincomb(coeffs: Sequence[float], arrays: Sequence[Array]) -> Array:
    """``sum(c * a)`` in the first array's dtype: one jitted kernel for JAX arrays, plain NumPy otherwise."""
    if all(isinstance(a, np.ndarray) for a in arrays):
        out = sum(c * a for c, a in zip(coeffs, arrays, strict=True))
        return out.astype(arrays[0].dtype)
    return _lincomb_jax(jnp.asarray(coeffs, jnp.float32), tuple(arrays))


def euler_step(x: Array, v: Array, sigma: float, sigma_next: float) -> Array:
    """One flow Euler step ``x + (sigma_next - sigma) v`` (diffusers' ``FlowMatchEulerDiscreteScheduler.step``)."""
    return _lincomb((1.0, float(sigma_next) - float(sigma)), (x, v))


def _log_snr(sigma: np.ndarray | float) -> np.ndarray:
    """The flow path's half log-SNR ``log(alpha / sigma)`` with ``alpha = 1 - sigma``; +inf at sigma = 0."""
    with np.errstate(divide="ignore"):
        return np.log(1.0 - np.float64(sigma)) - np.log(np.float64(sigma))


def _bh_coefficients(sigma_t: float, sigmas_s: Sequence[float], order: int, solver_type: str,
                     corrector: bool) -> tuple[float, list[float], float]:
    """One UniP (predictor) or UniC (corrector) B(h) update as a linear combination.

    ``sigma_t``: the target noise level; ``sigmas_s``: the levels of the stored x0 predictions,
    newest first (``s0, s1, ...``). Returns ``(c_x, c_m, c_new)`` with
    ``x_t = c_x x + sum_k c_m[k] m_k + c_new m_t`` (``m_t``, the x0 prediction at ``x_t``, only for
    the corrector). Transcribes diffusers' ``multistep_uni_p_bh_update`` /
    ``multistep_uni_c_bh_update`` with ``predict_x0=True`` and flow sigmas (alpha = 1 - sigma).
    """
    sigma_s0 = float(sigmas_s[0])
    alpha_t = 1.0 - float(sigma_t)
    lam_s0 = _log_snr(sigma_s0)
    h = _log_snr(sigma_t) - lam_s0
    hh = -h  # predict_x0
    h_phi_1 = np.expm1(hh)
    b_h = hh if solver_type == "bh1" else np.expm1(hh)
    rks = [(_log_snr(sigmas_s[k]) - lam_s0) / h for k in range(1, order)] + [1.0]
    rks = np.asarray(rks, np.float64)
    big_r, b = [], []
    h_phi_k = h_phi_1 / hh - 1.0
    factorial = 1
    for i in range(1, order + 1):
        big_r.append(rks ** (i - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    big_r, b = np.stack(big_r), np.asarray(b)

    c_x = float(sigma_t) / sigma_s0
    c_m = [0.0] * order
    c_m[0] = -alpha_t * h_phi_1
    c_new = 0.0
    if corrector:
        rhos = np.array([0.5]) if order == 1 else np.linalg.solve(big_r, b)
        c_new = -alpha_t * b_h * rhos[-1]
        c_m[0] -= c_new
    elif order >= 2:
        rhos = np.array([0.5]) if order == 2 else np.linalg.solve(big_r[:-1, :-1], b[:-1])
    else:
        rhos = np.zeros(0)
    for k in range(1, order):  # D1_k = (m_k - m0) / r_k
        w = -alpha_t * b_h * rhos[k - 1] / rks[k - 1]
        c_m[k] += w
        c_m[0] -= w
    return c_x, [float(c) for c in c_m], float(c_new)


class UniPCSolver:
    """diffusers' ``UniPCMultistepScheduler`` for flow models as a state machine over one sampling run.

    Call ``step(velocity, x)`` once per sigma in order, exactly as diffusers'
    ``scheduler.step(model_output, t, sample)``; it returns the next sample. Each call turns the
    velocity into an x0 prediction ``x - sigma v``, corrects the previous predictor's output with
    it (UniC, from the second step on, unless the step is in ``disable_corrector``) and then
    predicts the next sample (UniP) of order ``min(order, steps done + 1)``, lowered towards the
    end when ``lower_order_final``.

    Configuration: ``order`` is diffusers' ``solver_order`` (1 to 3 are tested), ``solver_type``
    ``"bh1"`` or ``"bh2"``. Two deliberate departures, both where diffusers is not finite: a final
    step to sigma 0 always uses order 1 (with ``lower_order_final=False`` diffusers' order-2 step
    to sigma 0 divides by a zero log-SNR ratio and returns inf), and with ``"bh1"`` the order-1
    step to sigma 0 returns the x0 prediction (diffusers computes ``-inf * 0`` and returns NaN).

    Works on JAX arrays (one small jitted kernel per update) and on NumPy arrays (float64 checks).
    """

    def __init__(self, sigmas: Sequence[float], *, order: int = 2, solver_type: Literal["bh1", "bh2"] = "bh2",
                 lower_order_final: bool = True, disable_corrector: Sequence[int] = ()):
        sigmas = np.asarray(sigmas, np.float64)
        if sigmas.ndim != 1 or len(sigmas) < 2:
            raise ValueError(f"sigmas must be a 1-D table of steps + 1 values, got shape {sigmas.shape}.")
        if np.any(np.diff(sigmas) >= 0) or sigmas[0] >= 1.0 or sigmas[-1] < 0.0:
            raise ValueError(
                "sigmas must decrease strictly inside [0, 1) (the log-SNR is -inf at 1): use unipc_sigmas(...)."
            )
        if order < 1:
            raise ValueError(f"order must be >= 1, got {order}.")
        if solver_type not in ("bh1", "bh2"):
            raise ValueError(f"unknown solver_type {solver_type!r}: use 'bh1' or 'bh2'.")
        self.sigmas = sigmas
        self.order = int(order)
        self.solver_type = solver_type
        self.lower_order_final = lower_order_final
        self.disable_corrector = frozenset(int(i) for i in disable_corrector)
        self.step_index = 0
        self._x0: list[Array] = []  # x0 predictions, newest last, at most `order`
        self._last_sample: Array | None = None
        self._this_order = 0
        self._lower_order_nums = 0

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1

    def step(self, velocity: Array, x: Array) -> Array:
        """Advance from ``sigmas[i]`` to ``sigmas[i + 1]`` given the model's velocity at ``x``."""
        i = self.step_index
        if i >= self.num_steps:
            raise RuntimeError(f"all {self.num_steps} steps are done; build a new UniPCSolver to sample again.")
        sig = self.sigmas
        m = _lincomb((1.0, -float(sig[i])), (x, velocity))  # x0 prediction at x (before correction)
        if i > 0 and (i - 1) not in self.disable_corrector and self._last_sample is not None:
            p = self._this_order
            c_x, c_m, c_new = _bh_coefficients(sig[i], sig[i - 1::-1][:p], p, self.solver_type, corrector=True)
            history = self._x0[::-1][:p]  # m0 = the newest stored prediction
            x = _lincomb((c_x, *c_m, c_new), (self._last_sample, *history, m))
        self._x0 = (self._x0 + [m])[-self.order:]
        order = min(self.order, self.num_steps - i) if self.lower_order_final else self.order
        order = min(order, self._lower_order_nums + 1)
        if sig[i + 1] == 0.0:
            order = 1
        self._this_order = order
        self._last_sample = x
        c_x, c_m, _ = _bh_coefficients(sig[i + 1], sig[i::-1][:order], order, self.solver_type, corrector=False)
        x_next = _lincomb((c_x, *c_m), (x, *self._x0[::-1][:order]))
        self._lower_order_nums = min(self._lower_order_nums + 1, self.order)
        self.step_index += 1
        return x_next


# --------------------------------------------------------------------------------------------------
# Guidance and the sampling loop


@jax.jit
def _cfg_inputs(x: jax.Array, sigma_frames: jax.Array, cond: Any, uncond: Any) -> tuple[jax.Array, jax.Array, Any]:
    both = lambda a, b: jnp.concatenate([a, b], axis=0)  # noqa: E731
    return both(x, x), both(sigma_frames, sigma_frames), jax.tree.map(both, cond, uncond)


@jax.jit
def _guide(v_c: jax.Array, v_u: jax.Array, scale: jax.Array) -> jax.Array:
    v_c, v_u = v_c.astype(jnp.float32), v_u.astype(jnp.float32)
    return v_u + scale * (v_c - v_u)


@jax.jit
def _cfg_combine(v: jax.Array, scale: jax.Array) -> jax.Array:
    return _guide(*jnp.split(v, 2, axis=0), scale)


def guided_velocity(denoise_fn: Callable[[jax.Array, jax.Array, Any], jax.Array], x: jax.Array,
                    sigma_frames: jax.Array, cond: Any = None, uncond: Any = None,
                    guidance_scale: float = 1.0) -> jax.Array:
    """The model's velocity with text classifier-free guidance ``v_u + s (v_c - v_u)``.

    With ``guidance_scale == 1`` the model runs once on ``cond`` (``uncond`` unused). Otherwise the
    conditional and unconditional halves run in one batched call: ``x`` and ``sigma_frames`` are
    repeated and every leaf of ``cond`` / ``uncond`` (e.g. caption / negative-caption embeddings
    and their masks) is concatenated along axis 0, so both pytrees must have the same structure
    and leaf shapes. The result is float32.
    """
    if guidance_scale == 1.0:
        return denoise_fn(x, sigma_frames, cond)
    if uncond is None:
        raise ValueError(
            f"guidance_scale={guidance_scale} needs uncond (e.g. the negative caption's embeddings); "
            "pass uncond=... or use guidance_scale=1.0 for no guidance."
        )
    if jax.tree.structure(cond) != jax.tree.structure(uncond):
        raise ValueError(
            f"cond and uncond must be pytrees of the same structure to batch them together, got "
            f"{jax.tree.structure(cond)} and {jax.tree.structure(uncond)}."
        )
    for a, b in zip(jax.tree.leaves(cond), jax.tree.leaves(uncond), strict=True):
        if jnp.shape(a) != jnp.shape(b):
            raise ValueError(
                f"a cond leaf has shape {jnp.shape(a)} but its uncond leaf has shape {jnp.shape(b)}: pad both "
                "captions to the same length so they can be batched in one call."
            )
    v = denoise_fn(*_cfg_inputs(x, sigma_frames, cond, uncond))
    return _cfg_combine(v, jnp.float32(guidance_scale))


@jax.jit
def _impose(x: jax.Array, given: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.where(mask.reshape(mask.shape + (1,) * (x.ndim - 2)), given, x)


@jax.jit
def _sigma_frames(mask: jax.Array, sigma: jax.Array) -> jax.Array:
    return jnp.where(mask, 0.0, sigma).astype(jnp.float32)


@jax.jit
def _release_given(x: jax.Array, given: jax.Array, noise: jax.Array, mask: jax.Array, sigma: jax.Array) -> jax.Array:
    """``x`` with its given frames put back on the flow at ``sigma``, as if they were generated frames."""
    noisy = (1.0 - sigma) * given + sigma * noise.astype(jnp.float32)
    return jnp.where(mask.reshape(mask.shape + (1,) * (x.ndim - 2)), noisy, x)


def keyframe_guided_velocity(denoise_fn: Callable[[jax.Array, jax.Array, Any], jax.Array], x: jax.Array,
                             sigma: jax.Array, given_latents: jax.Array, given_mask: jax.Array, noise: jax.Array,
                             scale: float, cond: Any = None, uncond: Any = None,
                             guidance_scale: float = 1.0) -> jax.Array:
    """Keyframe guidance ``v_free + scale (v_kf - v_free)`` on top of text guidance.

    ``v_kf`` is the (text-guided) velocity with the given frames clean, as ``sample`` runs the model;
    ``v_free`` the same model's velocity with the given frames released, i.e. put back on the flow at
    the current ``sigma`` from their share of ``noise`` (sigma ``sigma`` on every frame): the model
    without its keyframes, which it learns from keyframe dropout (``train.keyframe_dropout``). Scales
    above 1 push the generated frames toward what the keyframes, and not the prior alone, imply: a
    small DiT's interpolated frames otherwise drift to the dataset mean (an object fading into the
    background midway between two keyframes). Costs a second model evaluation per step.
    """
    v_kf = guided_velocity(denoise_fn, x, _sigma_frames(given_mask, sigma), cond, uncond, guidance_scale)
    if scale == 1.0:
        return v_kf
    free_x = _release_given(x, given_latents, noise, given_mask, sigma)
    free_sigma = jnp.broadcast_to(sigma, given_mask.shape).astype(jnp.float32)
    v_free = guided_velocity(denoise_fn, free_x, free_sigma, cond, uncond, guidance_scale)
    return _guide(v_kf, v_free, jnp.float32(scale))


def sample(denoise_fn: Callable[[jax.Array, jax.Array, Any], jax.Array], noise: jax.Array, *, steps: int,
           sampler: Literal["unipc", "euler"] = "unipc", shift: float = 1.0, given_latents: jax.Array | None = None,
           given_mask: jax.Array | None = None, guidance_scale: float = 1.0, cond: Any = None, uncond: Any = None,
           keyframe_guidance: float = 1.0, solver_order: int = 2, progress: bool = True) -> jax.Array:
    """Integrate the flow from ``noise`` (sigma 1) to clean latents (sigma 0) in ``steps`` model calls.

    ``denoise_fn(x_t, sigma_frames, cond) -> velocity``: ``x_t`` ``(B, T', h, w, C)`` float32,
    ``sigma_frames`` ``(B, T')`` float32 in [0, 1] (0 on given frames), ``cond`` a pytree batched on
    axis 0 (under guidance the batch is 2B, see ``guided_velocity``). It is called as given, once
    per step: pass a jitted function (e.g. ``jax.jit(lambda x, s, c: model(x, s * 1000, c))`` over
    a split NNX module) so it compiles once; the solver arithmetic around it is jitted here.

    ``sampler``: ``"unipc"`` (``UniPCSolver`` of order ``solver_order``, bh2, lower order final;
    diffusers' Wan default) or ``"euler"``; the sigma table is ``sampler_sigmas(sampler, steps,
    shift)``. ``given_latents`` / ``given_mask`` (``(B, T')`` bool): given frames are written into
    ``x`` before every model call and after every update, and their sigma is 0, so they come out
    exactly as given. ``keyframe_guidance`` != 1 guides toward the given frames
    (``keyframe_guided_velocity``; needs given frames, two model calls per step). The loop runs in
    float32 and returns ``noise``'s dtype; it is deterministic (same noise and model, same result).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: use one of {SAMPLERS}.")
    _check_steps(steps)
    noise = jnp.asarray(noise)
    if noise.ndim < 2:
        raise ValueError(f"noise must be latents (B, T', h, w, C), got shape {noise.shape}.")
    batch_frames = noise.shape[:2]
    if (given_latents is None) != (given_mask is None):
        raise ValueError("given_latents and given_mask go together: pass both (or neither for no given frames).")
    if given_mask is not None:
        given_mask = jnp.asarray(given_mask)
        if given_mask.shape != batch_frames:
            raise ValueError(
                f"given_mask has shape {given_mask.shape}: it needs one bool per latent frame, shape {batch_frames}."
            )
        given_mask = given_mask.astype(bool)
        given_latents = jnp.asarray(given_latents)
        if given_latents.shape != noise.shape:
            raise ValueError(
                f"given_latents has shape {given_latents.shape} but noise has {noise.shape}: give full-size latents "
                "(values on frames outside given_mask are ignored)."
            )
        given_latents = given_latents.astype(jnp.float32)
    if guidance_scale != 1.0 and uncond is None:
        raise ValueError(
            f"guidance_scale={guidance_scale} needs uncond (the negative caption's conditioning); pass uncond=... "
            "or guidance_scale=1.0."
        )

    if keyframe_guidance != 1.0 and given_mask is None:
        raise ValueError(f"keyframe_guidance={keyframe_guidance} guides toward given frames, but none are given: pass "
                         "given_latents and given_mask, or keyframe_guidance=1.0.")
    if not np.isfinite(keyframe_guidance):
        raise ValueError(f"keyframe_guidance must be a finite number, got {keyframe_guidance}.")

    sigmas = sampler_sigmas(sampler, steps, shift)
    solver = UniPCSolver(sigmas, order=solver_order) if sampler == "unipc" else None
    mask = given_mask if given_mask is not None else jnp.zeros(batch_frames, bool)
    impose = (lambda x: _impose(x, given_latents, given_mask)) if given_mask is not None else (lambda x: x)

    x = impose(noise.astype(jnp.float32))
    for i in tqdm(range(steps), desc=f"{sampler} sampling", disable=not progress):
        if keyframe_guidance != 1.0:
            v = keyframe_guided_velocity(denoise_fn, x, jnp.float32(sigmas[i]), given_latents, given_mask, noise,
                                         keyframe_guidance, cond, uncond, guidance_scale)
        else:
            v = guided_velocity(denoise_fn, x, _sigma_frames(mask, jnp.float32(sigmas[i])), cond, uncond,
                                guidance_scale)
        if jnp.shape(v) != x.shape:
            raise ValueError(f"denoise_fn returned shape {jnp.shape(v)} for latents of shape {x.shape}: it must match.")
        x = solver.step(v, x) if solver is not None else euler_step(x, v, sigmas[i], sigmas[i + 1])
        x = impose(x)
    return x.astype(noise.dtype)
