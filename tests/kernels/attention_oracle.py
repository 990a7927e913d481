"""float64 NumPy causal GQA attention with its hand-written VJP: the oracle of kernels.attention and
kernels.jvp_attention (Vaswani et al. 2017 with the causal and same-segment mask; head h reads kv head h // G)."""
from __future__ import annotations

import numpy as np


def np_attention_vjp(q, k, v, seg, go, glse=None, scale=None):
    """-> (o [B,S,H,D], lse [B,H,S]), (dq, dk, dv) of <o, go> + <lse, glse>.

    Per head, with S = scale q k^T + M, P = softmax(S), o = P v, lse = logsumexp(S):
      dv = P^T go,  dS = P * (go v^T - rowsum(go * o)) + P * glse,  dq = scale dS k,  dk = scale dS^T q.
    """
    q, k, v, go = (np.asarray(x, np.float64) for x in (q, k, v, go))
    b, s, h, d = q.shape
    g = h // k.shape[2]
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    glse = np.zeros((b, h, s)) if glse is None else np.asarray(glse, np.float64)
    o, lse = np.zeros_like(q), np.zeros((b, h, s))
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    allowed = np.tril(np.ones((s, s), bool))
    for bi in range(b):
        m = allowed if seg is None else allowed & (np.asarray(seg)[bi][:, None] == np.asarray(seg)[bi][None, :])
        for hi in range(h):
            kh, vh = k[bi, :, hi // g], v[bi, :, hi // g]
            sc = np.where(m, q[bi, :, hi] @ kh.T * scale, -np.inf)
            mx = sc.max(-1, keepdims=True)
            w = np.exp(sc - mx)
            p = w / w.sum(-1, keepdims=True)
            o[bi, :, hi] = p @ vh
            lse[bi, hi] = (mx + np.log(w.sum(-1, keepdims=True)))[:, 0]
            goh = go[bi, :, hi]
            ds = p * (goh @ vh.T - np.sum(goh * o[bi, :, hi], -1, keepdims=True)) + p * glse[bi, hi][:, None]
            dq[bi, :, hi] = scale * ds @ kh
            dk[bi, :, hi // g] += scale * ds.T @ q[bi, :, hi]
            dv[bi, :, hi // g] += p.T @ goh
    return (o, lse), (dq, dk, dv)
