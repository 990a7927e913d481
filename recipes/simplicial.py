"""Hybrid byte-level LM with 2-simplicial attention every 4th layer (Roy et al. 2025), the rest global attention.

Default: the tiny CPU model of recipes.dense_lm (4 layers, d_model 192) with layer 3 a sliding-window
2-simplicial mixer (4 query heads on 1 K/V head, w1=32, w2=4 at seq 128), on unpacked stdlib rows (data.packing=false:
one document per row, so the model gets no segment_ids and a GPU keeps the cuDNN simplicial path).

    python -m recipes.simplicial                     # the hybrid alone (~1-2 min on 2 CPU cores)
    python -m recipes.simplicial --preset compare    # hybrid and the dense baseline at equal steps, one table
    python -m recipes.simplicial --preset dense      # only the dense baseline (same data, steps, optimizer)

`compare` (the preset, or `--set compare=true` on any config) trains the dense twin and the config itself one
after the other into <run dir>/dense and <run dir>/hybrid (same seed, data order and optimizer; `--set`
overrides apply to both) and prints final train and eval losses.
Preset `gpu_1b`: the 1B dense_lm GPU preset with every 4th layer simplicial (paper setting w1=512, w2=32,
64 query heads per K/V head).

Issue 21's GPU comparison at three sizes (`REPRO_SIZES`: s / m / l = 24M / 75M / 180M non-embedding parameters),
driven by `python -m tools.repro_simplicial` (docs/results/simplicial.md): preset `repro_<size>` is the hybrid,
`repro_<size>_dense` its dense twin (equal parameters, tokens, data order and optimizer), `compare_<size>` both
one after the other as `--preset compare` does.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import sys

from axlearn_like.checkpoint import CheckpointConfig
from axlearn_like.cli import recipe_main
from axlearn_like.config import config_class
from axlearn_like.data import DataConfig
from axlearn_like.optimizers import OptimizerConfig
from axlearn_like.trainer import ExperimentConfig, TrainerConfig
from models.attention import AttentionConfig
from models.decoder import DecoderConfig
from models.layers import MLPConfig
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


REPRO_ROOT = "runs/simplicial_repro"  # tools.repro_simplicial's default root: tokenizer.json, <size>_<variant>/

# size -> (d_model, num_layers, heads, mlp_dim, peak learning rate). Every size: head_dim 128, seq 1024.
REPRO_SIZES = {
    "s": (512, 8, 4, 1408, 1.5e-3),
    "m": (768, 12, 6, 2048, 1.0e-3),
    "l": (1024, 16, 8, 2816, 8e-4),
}
REPRO_STEPS = 400  # x 64 rows x 1024 tokens = 26.2M tokens for every run (equal tokens across variants and sizes)


def repro(size: str) -> SimplicialExperimentConfig:
    """Issue 21's hybrid at `size` (REPRO_SIZES; one H200, sizing and predicted wall times in
    docs/results/simplicial.md and `python -m tools.repro_simplicial plan`).

    num_layers layers of d_model, SwiGLU mlp_dim, untied 32768-token BPE (trained on the corpus by
    tools.repro_simplicial into <root>/tokenizer.json); mixers (attention, attention, attention, simplicial)
    repeated: every 4th layer 2-simplicial at the paper's windows w1 = 512, w2 = 32 (trilinear, rope none, the
    reference k2/v2 biases), `heads` query heads of 128 on ONE shared K/V/K'/V' head, the attention layers
    `heads` query heads on TWO K/V heads. Parameters per mixer: attention d x 128 x (2 heads + 2 x 2), simplicial
    d x 128 x (2 heads + 4 x 1): equal, so the hybrid and its dense twin (`dense_twin`: every mixer the
    attention entry) have exactly the same parameter count (tests/tools/test_repro_simplicial.py checks it);
    the hybrid spends more FLOPs per token (the simplicial op, `SimplicialConfig.extra_flops`), which the
    report puts beside the losses. bf16 compute, float32 weights, remat save_named (as dense_lm gpu_1b).
    Data: the Python installation's sources and docs (data.paths=python_install, as recipes.moe _balance_gpu and
    recipes.mamba2 repro_lengthgen), unpacked rows of 1024 tokens (packing=False: a document always starts its
    row, so the model gets no segment_ids, DataConfig.multi_document_rows), 64 rows = 65536
    tokens/step, REPRO_STEPS steps. AdamW (b2 0.95, wd 0.1, clip 1), warmup 40, cosine to 0.1 x peak."""
    if size not in REPRO_SIZES:
        raise ValueError(f"size {size!r} is not one of {list(REPRO_SIZES)}")
    d, layers, heads, mlp, lr = REPRO_SIZES[size]
    attention = AttentionConfig(num_heads=heads, num_kv_heads=2, head_dim=128)
    simplicial = SimplicialConfig(num_heads=heads, num_kv_heads=1, head_dim=128, w1=512, w2=32)
    cfg = _recipe_config(dense_lm.config())
    cfg.name = f"simplicial_repro_{size}"
    cfg.model = DecoderConfig(
        vocab_size=32768, d_model=d, num_layers=layers, layer_pattern=_hybrid(attention, simplicial),
        ffn_pattern=(MLPConfig(mlp_dim=mlp),), tie_embeddings=False, dtype="bfloat16", remat_policy="save_named",
    )
    cfg.model.sample.tokens = 0
    cfg.data = DataConfig(source="text", paths=("python_install",), tokenizer=f"{REPRO_ROOT}/tokenizer.json",
                          seq_len=1024, global_batch_size=64, max_bytes=2_000_000_000, packing=False)
    cfg.optimizer = OptimizerConfig(learning_rate=lr, warmup_steps=40, min_lr_ratio=0.1, weight_decay=0.1)
    cfg.trainer = TrainerConfig(steps=REPRO_STEPS, log_every=10, eval_every=100, eval_batches=8)
    cfg.checkpoint = CheckpointConfig(every_steps=100, max_to_keep=2)
    cfg.run_dir = f"{REPRO_ROOT}/{size}_hybrid"
    return cfg


def repro_dense(size: str) -> SimplicialExperimentConfig:
    """The dense twin of `repro(size)`: every mixer the attention entry; everything else equal."""
    cfg = dense_twin(repro(size))
    cfg.name = f"simplicial_repro_{size}_dense"
    cfg.run_dir = f"{REPRO_ROOT}/{size}_dense"
    return cfg


def repro_compare(size: str) -> SimplicialExperimentConfig:
    """Both of `size` one after the other (`run_compare`: <run dir>/dense, <run dir>/hybrid)."""
    cfg = repro(size)
    cfg.name = f"simplicial_compare_{size}"
    cfg.compare = True
    cfg.run_dir = f"{REPRO_ROOT}/compare_{size}"
    return cfg


PRESETS = {"default": config, "dense": dense, "compare": compare, "gpu_1b": gpu_1b}
for _size in REPRO_SIZES:
    PRESETS[f"repro_{_size}"] = (lambda s=_size: repro(s))
    PRESETS[f"repro_{_size}_dense"] = (lambda s=_size: repro_dense(s))
    PRESETS[f"compare_{_size}"] = (lambda s=_size: repro_compare(s))
del _size


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
