"""Hugging Face checkpoint families for `python -m tools.import_hf` / `python -m tools.export_hf`.

A family is one module `tools/hf/<name>.py`, listed in FAMILIES below, that defines:

  MODEL_TYPES   dict[str, str]: each config.json `model_type` it reads -> the `architectures` entry it writes.
  RECIPE        the recipe an import starts from (`recipes.<RECIPE>.config()`; its model is replaced).
  model_fields(hf: dict) -> dict
                the DecoderConfig fields a config.json determines (vocab_size, d_model, num_layers,
                layer_pattern, ffn_pattern, tie_embeddings, norm_eps, ...). A field with no exact counterpart
                raises `common.UnsupportedError("<hf field>: <why / the fix>")`, never an approximation.
  from_hf(hf: dict, model: DecoderConfig, tensors: common.TensorReader) -> (params, stats | None)
                numpy trees in the *unscanned* layout (`stack/layer_<i>/...`; the driver stacks them for
                scan_layers). Read tensors with `tensors.get(name)` (float32 for float tensors) and
                `tensors.has(name)`; every tensor of the folder must be read (the driver names any left
                over), except names matching the optional module constant IGNORED (regexes).
  accepts(model: DecoderConfig) -> str | None
                None when this family can write `model` exactly, else a short reason (export picks the
                first family in FAMILIES that accepts a project model).
  to_hf(model: DecoderConfig, params, stats, base: dict | None, model_type: str | None) -> (config, tensors)
                the config.json dict and name -> numpy tensors (float32; the driver casts to the export
                dtype). `base` is the config.json the run was imported from (RUN_DIR/hf_source/), or None;
                keep its fields that the model does not determine (token ids, max_position_embeddings...).
                `model_type`: the one asked for with --model-type (None: the family's choice).

tools/hf/common.py holds what families share: safetensors folders (single file or sharded + index, bf16),
config reading, rope parameters, name/transpose helpers, and the import/export drivers.
"""
from __future__ import annotations

import importlib
from types import ModuleType

FAMILIES = ("llama", "mamba2", "deepseek", "granite")


def family_modules() -> list[ModuleType]:
    """The family modules, in FAMILIES order."""
    return [importlib.import_module(f"tools.hf.{name}") for name in FAMILIES]


def family_for(model_type: str) -> ModuleType:
    """The family module that reads `model_type`; UnsupportedError (one line) listing the known ones."""
    from tools.hf.common import UnsupportedError

    known = {}
    for mod in family_modules():
        for mt in mod.MODEL_TYPES:
            known[mt] = mod
    if model_type not in known:
        raise UnsupportedError(f"model_type: {model_type!r} has no converter; supported: {', '.join(sorted(known))}")
    return known[model_type]
