"""Bidirectional EBT vs a same-size denoiser on scikit-learn's bundled 8x8 digits (models.ebt_denoise).

    python -m recipes.ebt_denoise [--set trainer.steps=600 --set model.noise_std=0.2 ...]

trains both models on the shared trainer (progress, checkpoints, resume, metrics.jsonl) into
<run dir>/ebt and <run dir>/denoiser (same data order and optimizer; `--set` overrides apply to both), then
prints the PSNR table at the training noise and at 2x and writes <run dir>/denoise_results.json.
`--set compare=false` trains only `model.kind` in the run dir itself. Pixels are in [0, 1]; PSNR =
10 log10(1 / MSE) over the held-out images, outputs clipped to [0, 1] (DenoiseTask.eval_hook).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys

from axlearn_like.checkpoint import CheckpointConfig
from axlearn_like.cli import recipe_main
from axlearn_like.config import config_class
from axlearn_like.data.images import ImageDataConfig
from axlearn_like.optimizers import OptimizerConfig
from axlearn_like.trainer import ExperimentConfig, TrainerConfig
from models.ebt_denoise import BidirectionalAttentionConfig, DenoiseConfig
from models.layers import MLPConfig

KINDS = ("ebt", "denoiser")


@config_class
class DenoiseExperimentConfig(ExperimentConfig):
    """ExperimentConfig plus `compare`: `run` trains model.kind "ebt" and "denoiser" and prints both."""

    compare: bool = True


def config() -> DenoiseExperimentConfig:
    return DenoiseExperimentConfig(
        name="ebt_denoise",
        model=DenoiseConfig(
            vocab_size=1, d_model=64, num_layers=2, dtype="float32", think_steps=3, noise_std=0.2,
            layer_pattern=(BidirectionalAttentionConfig(num_heads=4, num_kv_heads=4, head_dim=16),),
            ffn_pattern=(MLPConfig(mlp_dim=128),)),
        data=ImageDataConfig(dataset="digits", global_batch_size=64, eval_examples=297),
        # Adam at a constant 2e-3 (b2 0.999), no decay or clipping: the setting the comparison was tuned with.
        optimizer=OptimizerConfig(learning_rate=2e-3, warmup_steps=0, schedule="constant", b2=0.999,
                                  weight_decay=0.0, clip_norm=None),
        trainer=TrainerConfig(steps=600, log_every=100, eval_every=600, eval_batches=5),
        checkpoint=CheckpointConfig(every_steps=300, max_to_keep=2),
    )


def _table(results: dict, noise_std: float, steps: int) -> list[str]:
    ebt, den = results["ebt"], results["denoiser"]
    return [f"| model | params | forward passes | PSNR @ sigma={noise_std:g} | PSNR @ sigma={2 * noise_std:g} |",
            "|---|---|---|---|---|",
            f"| noisy input | - | - | {ebt['psnr_noisy_1x']:.2f} | {ebt['psnr_noisy_2x']:.2f} |",
            f"| denoiser | {den['params']} | 1 | {den['psnr_1x']:.2f} | {den['psnr_2x']:.2f} |",
            f"| EBT, {steps} steps | {ebt['params']} | {steps} (+grad) | {ebt['psnr_1x']:.2f} | {ebt['psnr_2x']:.2f} |",
            f"| EBT, {2 * steps} steps | {ebt['params']} | {2 * steps} (+grad) | {ebt['psnr_1x_2x_steps']:.2f} | "
            f"{ebt['psnr_2x_2x_steps']:.2f} |"]


def run(cfg: DenoiseExperimentConfig) -> dict:
    """The recipe's run (axlearn_like.cli.recipe_main): both kinds and the table when cfg.compare, else the
    trainer on cfg alone. -> {kind: final eval metrics + "params"} (+ "table")."""
    from axlearn_like import trainer

    if not cfg.compare:
        return trainer.run(cfg)
    if cfg.trainer.eval_batches < 1:
        from axlearn_like.config import ConfigError

        raise ConfigError("trainer.eval_batches: the comparison reads the final eval (PSNR); set it >= 1")
    root = cfg.resolved_run_dir()
    results: dict = {"noise_std": cfg.model.noise_std}
    for kind in KINDS:
        c = copy.deepcopy(cfg)
        c.compare = False  # each saved config.json then resumes its own run alone
        c.name, c.run_dir = f"{cfg.name}_{kind}", os.path.join(root, kind)
        c.model = dataclasses.replace(cfg.model, kind=kind)
        r = trainer.run(c)
        results[kind] = dict(r["eval"], params=c.model.build().param_count())
    lines = _table(results, cfg.model.noise_std, cfg.model.think_steps)
    print("\n".join(lines), flush=True)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "denoise_results.json"), "w") as f:
        json.dump(results, f, indent=2)
    results["table"] = lines
    return results


if __name__ == "__main__":
    sys.exit(recipe_main("ebt_denoise"))  # the same path as `python -m recipes ebt_denoise`
