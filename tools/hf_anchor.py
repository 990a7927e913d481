"""The Hugging Face anchor of `tools.bench_generate`: greedy decoding with transformers, timed. Imports only
torch (passed in) and the standard library, so the interop venv's tests run the same code on the CPU.

`decoder(model, torch, ids)` picks how HF decodes: `generate` with its static KV cache where transformers can,
else HF's own forward calls on the model's own cache, one token per call (`greedy_forward`), the method named
in the result.
"""
from __future__ import annotations

import statistics
import time


def greedy_forward(model, torch, ids, n: int):
    """ids [B, P] (no padding) -> [B, P + n]: greedy tokens from HF forward calls on the model's cache, one new
    token per call after the prefill (what `generate` does per step, without its bookkeeping).

    For models whose `generate` fails: in transformers 5.17-5.18 it asks the cache for its length
    (`Cache.get_seq_length`), which a cache of Mamba layers only cannot answer (granitemoehybrid with every
    layer "mamba"; the forward asks too unless given positions, and its mask builder unless given a mask
    mapping). Positions and the mask mapping (None everywhere: no padding, causal within the call) are passed."""
    masks = {"full_attention": None, "linear_attention": None}
    pos = torch.arange(ids.shape[1], device=ids.device)[None]
    out = model(input_ids=ids, attention_mask=masks, position_ids=pos, use_cache=True)
    cache, toks = out.past_key_values, [out.logits[:, -1:].argmax(-1)]
    for i in range(n - 1):
        out = model(input_ids=toks[-1], attention_mask=masks, position_ids=pos[:, -1:] + 1 + i,
                    past_key_values=cache, use_cache=True)
        toks.append(out.logits[:, -1:].argmax(-1))
    return torch.cat([ids, *toks], 1)


def decoder(model, torch, ids):
    """-> (method, gen): gen(n) -> [B, P + n] greedy tokens, exactly n new ones (EOS ignored). Tries `generate`
    (static cache) once for one token; where transformers raises ValueError for this model (see
    `greedy_forward`), decodes with `greedy_forward` and says why in `method`."""
    sync = torch.cuda.synchronize if ids.device.type == "cuda" else (lambda: None)

    def generate(n):
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, cache_implementation="static", pad_token_id=0, eos_token_id=None)
        sync()
        return out

    def forward_loop(n):
        with torch.inference_mode():
            out = greedy_forward(model, torch, ids, n)
        sync()
        return out

    try:
        generate(1)
    except ValueError as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        return f"forward loop on HF's cache (generate failed: {why})", forward_loop
    return "generate, static cache", generate


def time_hf(model, torch, prompt, new_tokens: int, reps: int, device: str = "cuda") -> dict:
    """prompt int [B, P] -> prefill = one new token, decode = (time of new_tokens - time of 1) over the
    new_tokens - 1 later tokens; medians of `reps` synchronised calls after a warm-up (which holds the static
    cache's compile, when transformers compiles it)."""
    ids = torch.as_tensor(prompt, dtype=torch.long, device=device)
    method, gen = decoder(model, torch, ids)

    def timed(n):
        gen(n)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            gen(n)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    b, p = prompt.shape
    t1, tn = timed(1), timed(new_tokens)
    decode_s = max(tn - t1, 1e-9)
    return {"method": method, "prefill_ms": t1 * 1e3, "prefill_tok_s": b * p / t1,
            "decode_ms_per_step": decode_s * 1e3 / max(new_tokens - 1, 1),
            "decode_tok_s": b * max(new_tokens - 1, 1) / decode_s}
