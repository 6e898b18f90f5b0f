"""The attention entry point: the XLA reference against NumPy, key-length masking, bad input."""

import jax.numpy as jnp
import numpy as np
import pytest

from director_jax.kernels.attention import attention


def _numpy_attention(q, k, v, kv_len=None):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    scores = np.einsum("bshd,blhd->bhsl", q, k) / np.sqrt(q.shape[-1])
    if kv_len is not None:
        for b, n in enumerate(kv_len):
            scores[b, :, :, n:] = -np.inf
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhsl,blhd->bshd", p, v)


def test_xla_attention_matches_numpy_and_masks_padding():
    rng = np.random.RandomState(0)
    q, k, v = (rng.randn(2, 13, 3, 16).astype(np.float32) for _ in range(3))
    np.testing.assert_allclose(np.asarray(attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), impl="xla")),
                               _numpy_attention(q, k, v), atol=1e-5)
    # keys padded from 9 / 13 valid to 13: the padded keys must not change anything
    kv_len = np.array([9, 13])
    got = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), kv_len=jnp.asarray(kv_len), impl="xla")
    np.testing.assert_allclose(np.asarray(got), _numpy_attention(q, k, v, kv_len), atol=1e-5)
    np.testing.assert_allclose(np.asarray(got)[0], _numpy_attention(q[:1], k[:1, :9], v[:1, :9])[0], atol=1e-5)
    # auto picks the reference on the CPU
    np.testing.assert_array_equal(np.asarray(attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))),
                                  np.asarray(attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), impl="xla")))


def test_bad_input():
    x = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match="Unknown attention implementation 'flash'"):
        attention(x, x, x, impl="flash")
    with pytest.raises(ValueError, match=r"takes \(B, S, H, D\) arrays"):
        attention(x[0], x[0], x[0])
    with pytest.raises(ValueError, match="disagree"):
        attention(x, jnp.zeros((1, 4, 3, 8)), jnp.zeros((1, 4, 3, 8)))
