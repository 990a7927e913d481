"""`python -m tools.export_hf RUN_DIR OUT_DIR [--step N] [--model-type T] [--dtype D] [--max-shard-size 5GB]`:
a run dir's checkpoint -> a Hugging Face model folder that `AutoModelForCausalLM.from_pretrained(OUT_DIR)` loads
(config.json, model.safetensors or shards + model.safetensors.index.json, and the tokenizer files of an
imported run). The family (tools/hf/) is the imported source's, else the first that writes the model exactly
(dense attention + SwiGLU -> llama / qwen2 / qwen3 by biases and q/k norm; pure Mamba-2 -> mamba2; MLA + MoE ->
deepseek_v3; Mamba-2 / attention + SwiGLU -> granitemoehybrid); --model-type picks one. Non-gradient state the
outputs depend on (the MoE routing bias) is written too. --dtype: float32, bfloat16 or float16 (default: the
imported source's, else float32). A model without an exact counterpart is a one-line error.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from axlearn_like.cli import tool_main


@tool_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.export_hf", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--step", type=int, default=None, help="the checkpoint step (default: the latest)")
    p.add_argument("--model-type", default=None, help="the Hugging Face model_type to write (e.g. llama, qwen2)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    p.add_argument("--max-shard-size", default="5GB", help="shard the weights above this size (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in OUT_DIR")
    a = p.parse_args(argv)
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's notes on read-only managers are not for the user
    from tools.hf.common import export_hf

    model_type, files = export_hf(a.run_dir, a.out_dir, step=a.step, model_type=a.model_type, dtype=a.dtype,
                                  max_shard_size=a.max_shard_size, overwrite=a.overwrite)
    print(f"wrote {model_type} to {a.out_dir}: {', '.join(files[:4])}{' ...' if len(files) > 4 else ''}")
    print(f"load it: AutoModelForCausalLM.from_pretrained({os.path.abspath(a.out_dir)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
