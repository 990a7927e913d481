"""Sample text from a trained checkpoint.

    python -m tools.generate RUN_DIR --prompt "def " --tokens 200 [--temperature 0.8] [--top-k 40] [--seed 0]

Pure Mamba-2 models decode recurrently (prefill once, then one `models.ssm.decode_step` per token: constant
memory and time per token); models with attention use LanguageModel.generate (full recompute per token).
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from axlearn_like.cli import tool_main


def sample(run_dir: str, prompt: str, tokens: int, *, temperature: float = 0.8, top_k: int | None = None,
           seed: int = 0, step: int | None = None, recurrent: bool | None = None) -> tuple[str, str]:
    """-> (continuation text, method "recurrent" | "recompute")."""
    import jax

    from axlearn_like.data import make_tokenizer
    from models import ssm
    from tools.length_eval import load_run

    task, variables, cfg = load_run(run_dir, step)
    tok = make_tokenizer(cfg.data)
    ids = np.asarray([tok.encode(prompt)], np.int32)
    if ids.shape[1] == 0:
        raise ValueError("--prompt encodes to no tokens; give a non-empty prompt")
    use_rec = ssm.supports_recurrent_decode(task.cfg) if recurrent is None else recurrent
    rng = jax.random.PRNGKey(seed)
    if use_rec:
        out = ssm.generate(task, variables, ids, tokens, rng, temperature=temperature, top_k=top_k)
    else:
        out = task.generate(variables, ids, tokens, rng, temperature=temperature, top_k=top_k)
    new = [int(t) for t in np.asarray(out)[0, ids.shape[1]:]]
    return tok.decode(new), "recurrent" if use_rec else "recompute"


@tool_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.generate", description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--prompt", default="def ")
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="<= 0: greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, default=None)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    text, how = sample(a.run_dir, a.prompt, a.tokens, temperature=a.temperature, top_k=a.top_k, seed=a.seed,
                       step=a.step)
    print(a.prompt + text)
    print(f"[{a.tokens} tokens, {how} decode, {time.perf_counter() - t0:.1f}s incl. load and compile]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
