"""Hybrid byte-level LM with 2-simplicial attention every 4th layer (Roy et al. 2025), the rest global attention.

Default: the tiny CPU model of recipes.dense_lm (4 layers, d_model 192) with layer 3 a sliding-window
2-simplicial mixer (4 query heads on 1 K/V head, w1=32, w2=4 at seq 128), on unpacked stdlib rows (data.packing=false,
so no simplicial query ever has its window gated at a document boundary; see models/simplicial.py).

    python -m recipes.simplicial                     # the hybrid alone (~1-2 min on 2 CPU cores)
    python -m recipes.simplicial --preset compare    # hybrid and the dense baseline at equal steps, one table
    python -m recipes.simplicial --preset dense      # only the dense baseline (same data, steps, optimizer)

`compare` (the preset, or `--set compare=true` on any config) trains the dense twin and the config itself one
after the other into <run dir>/dense and <run dir>/hybrid (same seed, data order and optimizer; `--set`
overrides apply to both) and prints final train and eval losses.
Preset `gpu_1b`: the 1B dense_lm GPU preset with every 4th layer simplicial (paper setting w1=512, w2=32,
64 query heads per K/V head).
"""
from __future__ import annotations

import copy
import dataclasses
import os
import sys

from axlearn_like.cli import recipe_main
from axlearn_like.config import config_class
from axlearn_like.trainer import ExperimentConfig
from models.attention import AttentionConfig
from models.simplicial import SimplicialConfig
from recipes import dense_lm


def _hybrid(attention: AttentionConfig, simplicial: SimplicialConfig) -> tuple:
    """(attention, attention, attention, simplicial): 2-simplicial every 4th layer, each entry its own copy."""
    return tuple(dataclasses.replace(attention) for _ in range(3)) + (simplicial,)


@config_class
class SimplicialExperimentConfig(ExperimentConfig):
    """ExperimentConfig plus `compare`: `run` also trains the dense twin at equal steps and prints both."""

    compare: bool = False


def _recipe_config(cfg: ExperimentConfig) -> SimplicialExperimentConfig:
    return SimplicialExperimentConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(ExperimentConfig)})


def _dense() -> SimplicialExperimentConfig:
    cfg = _recipe_config(dense_lm.config())
    cfg.data.packing = False
    cfg.trainer.steps = 150
    cfg.trainer.eval_every = 150
    cfg.model.sample.tokens = 0
    cfg.checkpoint.every_steps = 150
    return cfg


def config():
    cfg = _dense()
    cfg.name = "simplicial"
    cfg.model.layer_pattern = _hybrid(cfg.model.layer_pattern[0],
                                      SimplicialConfig(num_heads=4, num_kv_heads=1, head_dim=32, w1=32, w2=4))
    return cfg


def dense():
    cfg = _dense()
    cfg.name = "simplicial_dense_baseline"
    return cfg


def compare():
    cfg = config()
    cfg.name = "simplicial_compare"
    cfg.compare = True
    return cfg


def gpu_1b():
    cfg = _recipe_config(dense_lm.gpu_1b())
    cfg.name = "simplicial_1b"
    cfg.model.layer_pattern = _hybrid(cfg.model.layer_pattern[0],
                                      SimplicialConfig(num_heads=64, num_kv_heads=1, head_dim=128, w1=512, w2=32))
    cfg.data.packing = False
    return cfg


PRESETS = {"default": config, "dense": dense, "compare": compare, "gpu_1b": gpu_1b}


def dense_twin(cfg):
    """The dense baseline of a hybrid config: every mixer its first attention layer, everything else equal."""
    twin = copy.deepcopy(cfg)
    twin.model.layer_pattern = (next(m for m in twin.model.layer_pattern if isinstance(m, AttentionConfig)),)
    return twin


def run_compare(cfg) -> dict:
    """Trains the dense twin and the hybrid at equal steps; prints and returns {name: (train, eval) loss}."""
    from axlearn_like import trainer

    root = cfg.resolved_run_dir()
    results = {}
    for name, c in (("dense", dense_twin(cfg)), ("hybrid", copy.deepcopy(cfg))):
        c.compare = False  # each saved config.json then resumes its own run alone
        c.name = f"{cfg.name}_{name}"
        c.run_dir = os.path.join(root, name)
        r = trainer.run(c)
        train = r.get("last_train", {}).get("train/loss", r.get("last_train", {}).get("train/objective"))
        results[name] = (float(train) if train is not None else float("nan"),
                         float(r.get("eval", {}).get("loss", float("nan"))))
    steps = cfg.trainer.steps
    print(f"\n{'model':<8} {'steps':>6} {'train loss':>11} {'eval loss':>10}   (nats/token; {root})")
    for name, (tr, ev) in results.items():
        print(f"{name:<8} {steps:>6} {tr:>11.4f} {ev:>10.4f}")
    return results


def run(cfg) -> dict:
    """The recipe's run (axlearn_like.cli.recipe_main): `run_compare` when cfg.compare, else the trainer."""
    from axlearn_like import trainer

    return run_compare(cfg) if getattr(cfg, "compare", False) else trainer.run(cfg)


if __name__ == "__main__":
    sys.exit(recipe_main("simplicial"))  # the same path as `python -m recipes simplicial`
