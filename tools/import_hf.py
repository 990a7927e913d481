"""`python -m tools.import_hf HF_DIR RUN_DIR [--set KEY=VALUE ...] [--step N] [--add-to-existing]`: a Hugging Face
model folder (config.json with `model_type`, model.safetensors or sharded model-0000i-of-0000n.safetensors +
index; float32, bfloat16 or float16) -> a run dir of the matching recipe (tools/hf/: Llama / Mistral / Qwen2 /
Qwen2.5 / Qwen3 -> dense_lm, Mamba-2 -> mamba2, DeepSeek-V2/V3 -> moe, GraniteMoeHybrid -> mamba2).

The run dir gets checkpoint step N (default 0) with the weights as float32 masters and a *fresh* optimizer
state, its config.json, and hf_source/ (the source's config and tokenizer files; data.tokenizer points at
its tokenizer.json when there is one). Continue training with `python -m recipes.<recipe> --run-dir RUN_DIR`,
open it with `axlearn_like.checkpoint.load(RUN_DIR)`, write it back with `python -m tools.export_hf`.
--set overrides the recipe config before anything is written (e.g. --set model.dtype=bfloat16
--set data.seq_len=4096). A config field or tensor without an exact counterpart is a one-line error.
"""
from __future__ import annotations

import argparse
import logging
import sys

from axlearn_like.cli import tool_main


@tool_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.import_hf", description=__doc__.split("\n\n")[0])
    p.add_argument("hf_dir", help="a Hugging Face model folder (config.json + safetensors)")
    p.add_argument("run_dir", help="the new run dir (must be new or empty unless --add-to-existing)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe config field")
    p.add_argument("--step", type=int, default=0, help="the checkpoint step to write (default 0)")
    p.add_argument("--add-to-existing", action="store_true",
                   help="RUN_DIR already holds a run: add the import as a later checkpoint (--step after its latest)")
    a = p.parse_args(argv)
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's notes on read-only managers are not for the user
    from tools.hf.common import import_hf

    ckpt, recipe = import_hf(a.hf_dir, a.run_dir, step=a.step, overrides=a.set, add_to_existing=a.add_to_existing)
    print(f"wrote checkpoint step {a.step} under {ckpt} (weights of {a.hf_dir}, fresh optimizer state)")
    print(f"continue training: python -m recipes.{recipe} --run-dir {a.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
