"""The timeline's chunk layout, MC-RoPE positions and multi-chunk encode / decode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from director_jax.models.multichunk import decode_timeline, encode_timeline
from director_jax.models.timeline import Span, Timeline, padded_length, place_given_frames
from director_jax.models.vae import WanVAE, WanVAEConfig

CFG = WanVAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1,
                   latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4)


class _Jitted:
    """The tiny VAE with jitted full-pass encode / decode (the timeline calls them per chunk group)."""

    def __init__(self, model: WanVAE):
        graphdef, state = nnx.split(model)
        self.model = model
        self._encode = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode(x))
        self._decode = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(z))
        self.encode = lambda x: self._encode(state, x)
        self.decode = lambda z: self._decode(state, z)


@pytest.fixture(scope="module")
def vae():
    return WanVAE(CFG, rngs=nnx.Rngs(3))


@pytest.fixture(scope="module")
def jitted(vae):
    return _Jitted(vae)


def _video(frames, seed=0, h=16, w=16):
    """A smooth moving pattern (so decoded frames carry structure), shape (1, T, H, W, 3)."""
    t = np.arange(frames)[:, None, None, None]
    y = np.arange(h)[None, :, None, None]
    x = np.arange(w)[None, None, :, None]
    c = np.arange(3)[None, None, None, :]
    rng = np.random.RandomState(seed)
    phase = rng.uniform(0, 2 * np.pi, 3)
    v = np.sin(0.4 * x + 0.3 * y + 0.5 * t + phase[c]) * 0.8
    return v[None].astype(np.float32)


def test_padded_length_is_the_next_4n_plus_1():
    for n in range(1, 40):
        p = padded_length(n)
        assert (p - 1) % 4 == 0 and n <= p < n + 4


def test_layout_of_keyframes_at_first_middle_last_with_uneven_spacing():
    layout = Timeline.from_keyframes(30, [0, 13, 29]).layout
    assert [(c.start, c.length, c.padded_length) for c in layout.chunks] == [(0, 13, 13), (13, 16, 17), (29, 1, 1)]
    # chunk 0 latents cover frames 0 | 1-4 | 5-8 | 9-12; chunk 1: 13 | 14-17 | ... | 26-29 (29, padding)
    assert layout.first_frame.tolist() == [0, 1, 5, 9, 13, 14, 18, 22, 26, 29]
    np.testing.assert_allclose(layout.position, np.array([0, 1, 5, 9, 13, 14, 18, 22, 26, 29]) / 4)
    assert layout.given.tolist() == [True, False, False, False, True, False, False, False, False, True]
    assert layout.chunk_id.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 2]
    # MC-RoPE: a keyframe at frame s sits at s/4, the chunk's next latents at s/4 + 1/4, s/4 + 5/4
    s = 13 / 4
    assert (layout.position[4], layout.position[5], layout.position[6]) == (s, s + 1 / 4, s + 5 / 4)


def test_layout_without_a_keyframe_at_frame_0_generates_the_opening():
    layout = Timeline.from_keyframes(12, [6]).layout
    assert [(c.start, c.length, c.given_frames) for c in layout.chunks] == [(0, 6, 0), (6, 6, 1)]
    assert layout.given.tolist() == [False, False, False, True, False, False]


def test_video_span_of_other_than_4n_plus_1_frames_is_its_own_chunk():
    # extension forward: 6 given frames, then 10 generated
    layout = Timeline(16, (Span(0, 6),)).layout
    assert [(c.start, c.length, c.given_frames) for c in layout.chunks] == [(0, 6, 6), (6, 10, 0)]
    # 6 frames pad to 9 (3 latents, all given); 10 pad to 13 (4 generated latents)
    assert layout.given.tolist() == [True] * 3 + [False] * 4
    assert layout.first_frame.tolist() == [0, 1, 5, 6, 7, 11, 15]
    # a 4n+1 span keeps its chunk going: the generated continuation follows in the same chunk
    layout = Timeline(16, (Span(0, 5),)).layout
    assert [(c.start, c.length) for c in layout.chunks] == [(0, 16)]
    assert layout.given.tolist() == [True, True, False, False, False]


def test_backward_and_in_between_extension_layouts():
    backward = Timeline(20, (Span(11, 9),)).layout  # given video at the end
    assert [(c.start, c.length, c.given_frames) for c in backward.chunks] == [(0, 11, 0), (11, 9, 9)]
    assert backward.given.tolist() == [False] * 4 + [True] * 3  # 11 -> 13 frames (4 latents), 9 (3)
    between = Timeline(25, (Span(0, 5), Span(20, 5))).layout
    assert [(c.start, c.length, c.given_frames) for c in between.chunks] == [(0, 20, 5), (20, 5, 5)]
    # 20 frames pad to 21 (6 latents; the first two cover the 5 given frames), then 5 given (2)
    assert between.given.tolist() == [True, True, False, False, False, False, True, True]


def _reference_encode(encode, video, layout):
    """Chunk by chunk, padding with NumPy: an independent path to the batched encoder's result."""
    means = []
    for c in layout.chunks:
        clip = video[:, c.start:c.end]
        pad = np.repeat(clip[:, -1:], c.padded_length - c.length, axis=1)
        means.append(np.asarray(encode(jnp.asarray(np.concatenate([clip, pad], axis=1)))[0]))
    return np.concatenate(means, axis=1)


@pytest.mark.parametrize("num_frames,keyframes", [(21, [0]), (21, [10]), (21, [20]), (23, [0, 7, 22]),
                                                  (19, [3, 9, 15])])
def test_multichunk_roundtrip_places_keyframes_exactly(vae, jitted, num_frames, keyframes):
    video = _video(num_frames, seed=num_frames)
    layout = Timeline.from_keyframes(num_frames, keyframes).layout
    mean, logvar = encode_timeline(vae, jnp.asarray(video), layout, encode=jitted.encode)
    assert mean.shape == logvar.shape == (1, layout.num_latents, 2, 2, 4)
    np.testing.assert_allclose(mean, _reference_encode(jitted.encode, video, layout), atol=1e-5)
    decoded = np.asarray(decode_timeline(vae, mean, layout, decode=jitted.decode))
    assert decoded.shape == video.shape  # exactly T frames: padding dropped
    for k in keyframes:
        alone_mean, _ = jitted.encode(jnp.asarray(video[:, k:k + 1]))
        # the keyframe's latent is the encoding of that frame alone...
        np.testing.assert_allclose(mean[:, layout.latent_of_frame(k)], alone_mean[:, 0], atol=1e-5)
        # ...and its decoded frame is the decode of that frame encoded alone
        np.testing.assert_allclose(decoded[:, k], np.asarray(jitted.decode(alone_mean))[:, 0], atol=1e-5)


def test_given_latents_do_not_depend_on_generated_frames(vae, jitted):
    video = _video(17, seed=4)
    layout = Timeline(17, (Span(0, 5), Span(12))).layout
    noisy = video.copy()
    generated = np.ones(17, bool)
    generated[[0, 1, 2, 3, 4, 12]] = False
    noisy[:, generated] = np.random.RandomState(0).uniform(-1, 1, noisy[:, generated].shape)
    a, _ = encode_timeline(vae, jnp.asarray(video), layout, encode=jitted.encode)
    b, _ = encode_timeline(vae, jnp.asarray(noisy), layout, encode=jitted.encode)
    np.testing.assert_allclose(np.asarray(a)[:, layout.given], np.asarray(b)[:, layout.given], atol=1e-6)
    assert np.abs(np.asarray(a)[:, ~layout.given] - np.asarray(b)[:, ~layout.given]).max() > 1e-3


def test_streaming_decoder_plugs_into_the_timeline(vae, jitted):
    video = _video(14, seed=2)
    layout = Timeline.from_keyframes(14, [0, 6]).layout
    mean, _ = encode_timeline(vae, jnp.asarray(video), layout, encode=vae.encode_streaming)
    full = decode_timeline(vae, mean, layout, decode=jitted.decode)
    streamed = decode_timeline(vae, mean, layout, decode=lambda z: jnp.asarray(vae.decode_streaming(z)))
    np.testing.assert_allclose(streamed, full, atol=1e-5)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: Timeline.from_keyframes(10, [10]), r"outside the timeline of 10 frames"),
        (lambda: Timeline.from_keyframes(10, [-1]), r"outside the timeline"),
        (lambda: Timeline.from_keyframes(10, [3, 3]), r"more than once"),
        (lambda: Timeline(10, (Span(3), Span(3))), r"given twice"),
        (lambda: Timeline(10, (Span(0, 5), Span(4))), r"overlap"),
        (lambda: Timeline(0), r"empty"),
        (lambda: Timeline(10, (Span(2, 0),)), r"length 0"),
    ],
)
def test_bad_timelines_fail_clearly(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_video_and_latent_shapes_are_checked(vae):
    layout = Timeline.from_keyframes(9, [0]).layout
    with pytest.raises(ValueError, match=r"\(B, 9, H, W, C\)"):
        encode_timeline(vae, jnp.zeros((1, 8, 16, 16, 3)), layout)
    with pytest.raises(ValueError, match=rf"\(B, {layout.num_latents}, h, w, z\)"):
        decode_timeline(vae, jnp.zeros((1, 2, 2, 2, 4)), layout)


def test_place_given_frames():
    key = np.full((4, 4, 3), 0.5, np.float32)
    clip = np.full((3, 4, 4, 3), -0.5, np.float32)
    video = place_given_frames(8, {0: clip, 6: key})
    assert video.shape == (8, 4, 4, 3)
    assert (video[0:3] == -0.5).all() and (video[6] == 0.5).all() and (video[[3, 4, 5, 7]] == 0).all()
    with pytest.raises(ValueError, match="outside"):
        place_given_frames(8, {7: clip})


def test_keyframe_times_and_too_many_spans():
    from director_jax.models.timeline import frame_at_time

    assert frame_at_time(0, 16, 81) == 0
    assert frame_at_time("2.5s", 16, 81) == 40
    assert frame_at_time("5", 16, 81) == 80  # the last frame of a 81-frame, 16 fps video
    assert frame_at_time("#13", 16, 81) == 13
    with pytest.raises(ValueError, match=r"outside the video: 81 frames = 5.0625 s"):
        frame_at_time(5.1, 16, 81)
    with pytest.raises(ValueError, match="outside the video"):
        frame_at_time("#81", 16, 81)
    with pytest.raises(ValueError, match="neither seconds"):
        frame_at_time("two", 16, 81)
    with pytest.raises(ValueError, match="4 given spans hold 4 frames but the timeline has only 3"):
        Timeline.from_keyframes(3, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="hold 7 frames but the timeline has only 6"):
        Timeline.from_keyframes(6, [0], videos=[(1, 6)])
