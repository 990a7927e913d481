"""Sample text from a trained checkpoint.

    python -m tools.generate RUN_DIR --prompt "def " --tokens 200 [--temperature 0.8] [--top-k 40] [--top-p 0.9]
        [--seed 0] [--recompute]

Every model with cached decoding (`Task.supports_cached_decoding`: stacks whose mixer kinds implement it,
`MixerConfig.decode_cache`: attention, MLA, 2-simplicial, Mamba-2; and the EBT's efficient form, whose observed
stream is the cache) prefills the prompt once and then runs one jit-compiled fixed-shape `decode_step` per
token (KV / latent / window caches; a constant-size state for pure Mamba-2 stacks); other models and
`--recompute` re-run the whole sequence per new token.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from axlearn_like.cli import tool_main


def sample(run_dir: str, prompt: str, tokens: int, *, temperature: float = 0.8, top_k: int | None = None,
           top_p: float | None = None, seed: int = 0, step: int | None = None, cached: bool | None = None,
           recurrent: bool | None = None) -> tuple[str, str]:
    """-> (continuation text, method: "recurrent" (cached decoding of a pure recurrent stack), "cached" (KV /
    window caches) or "recompute"). cached=None: cached decoding where the model supports it (`recurrent` is
    the older name of the same switch)."""
    import jax

    from axlearn_like.data import make_tokenizer
    from tools.length_eval import load_run

    task, variables, cfg = load_run(run_dir, step)
    tok = make_tokenizer(cfg.data)
    ids = np.asarray([tok.encode(prompt)], np.int32)
    if ids.shape[1] == 0:
        raise ValueError("--prompt encodes to no tokens; give a non-empty prompt")
    cached = recurrent if cached is None else cached
    supported = task.supports_cached_decoding
    use_cache = supported if cached is None else bool(cached)
    if use_cache and not supported:
        raise ValueError(f"{type(task).__name__}: this model has no cached decoding; drop the cached option")
    kw = {} if top_p is None else {"top_p": top_p}
    if supported:
        kw["cached"] = use_cache
    out = task.generate(variables, ids, tokens, jax.random.PRNGKey(seed), temperature=temperature, top_k=top_k, **kw)
    new = [int(t) for t in np.asarray(out)[0, ids.shape[1]:]]
    how = ("recurrent" if getattr(task.cfg, "recurrent", False) else "cached") if use_cache else "recompute"
    return tok.decode(new), how


@tool_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.generate", description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--prompt", default="def ")
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="<= 0: greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling: keep the most likely tokens up to this probability mass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--recompute", action="store_true", help="re-run the whole sequence per token (no cache)")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    text, how = sample(a.run_dir, a.prompt, a.tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                       seed=a.seed, step=a.step, cached=False if a.recompute else None)
    print(a.prompt + text)
    print(f"[{a.tokens} tokens, {how} decode, {time.perf_counter() - t0:.1f}s incl. load and compile]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
