"""Pure-jnp grouped matmul: the dense one-hot / masked oracle (tests) and nothing else.

Conventions shared by every implementation: rows of `lhs` are sorted by group; group g owns rows
[offset_g, offset_g + group_sizes[g]) with offset_g = sum_{h<g} group_sizes[h]; rows at or past
sum(group_sizes) belong to no group and give zero output rows.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def row_group_one_hot(group_sizes: jax.Array, m: int) -> jax.Array:
    """[m, groups] float32 one-hot of each row's group (all-zero rows past sum(group_sizes))."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    gid = jnp.searchsorted(ends, jnp.arange(m, dtype=jnp.int32), side="right")
    return jax.nn.one_hot(gid, group_sizes.shape[0], dtype=jnp.float32)


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, transpose_rhs: bool = False) -> jax.Array:
    """out[i] = lhs[i] @ rhs[g(i)] (or rhs[g(i)]^T); lhs [m, k], rhs [G, k, n] ([G, n, k] if transposed) -> [m, n]."""
    onehot = row_group_one_hot(group_sizes, lhs.shape[0])
    eq = "mk,gnk,mg->mn" if transpose_rhs else "mk,gkn,mg->mn"
    out = jnp.einsum(eq, lhs.astype(jnp.float32), rhs.astype(jnp.float32), onehot, precision="highest")
    return out.astype(lhs.dtype)


def transposed_grouped_matmul(lhs: jax.Array, dout: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """out[g] = lhs_g^T @ dout_g over the rows of group g; lhs [m, k], dout [m, n] -> [G, k, n]."""
    onehot = row_group_one_hot(group_sizes, lhs.shape[0])
    out = jnp.einsum("mk,mn,mg->gkn", lhs.astype(jnp.float32), dout.astype(jnp.float32), onehot, precision="highest")
    return out.astype(lhs.dtype)
