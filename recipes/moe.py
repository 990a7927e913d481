"""DeepSeek-V3-like small MoE LM on stdlib bytes: first layer dense, the rest MoE (sigmoid gate, shared expert,
aux-loss-free bias balancing + sequence-wise balance loss).

Presets reproduce Wang et al.'s comparison in miniature (compare `train/.../maxvio_batch` in metrics.jsonl and
`python -m tools.plot_moe RUN_DIR`):
  no_balance    gamma 0, no balance loss
  aux_loss      gamma 0, V1/V2 expert-level balance loss (alpha 1e-2)
  aux_free      bias balancing only (gamma 1e-3 x steps scale)
  aux_free_seq  bias balancing + V3 sequence-wise loss (alpha 1e-4)   [default]
Scale out: `--set mesh.expert=4 --set model.moe.device_limited_m=2` (device-limited routing over the expert axis).
"""
from __future__ import annotations

import sys

from axlearn_like.checkpoint import CheckpointConfig
from axlearn_like.cli import main
from axlearn_like.data import DataConfig
from axlearn_like.optimizers import OptimizerConfig
from axlearn_like.trainer import ExperimentConfig, TrainerConfig
from models.attention import AttentionConfig
from models.decoder import DecoderConfig
from models.moe import MoEConfig


def _base(moe: MoEConfig, name: str) -> ExperimentConfig:
    return ExperimentConfig(
        name=name,
        model=DecoderConfig(
            vocab_size=258,
            d_model=128,
            num_layers=4,
            ffn_pattern=("mlp", "moe", "moe", "moe"),
            attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=32),
            mlp_dim=384,
            tie_embeddings=True,
            dtype="float32",
            moe=moe,
        ),
        data=DataConfig(source="text", paths=("stdlib",), seq_len=128, global_batch_size=16, max_bytes=4_000_000),
        optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=30),
        trainer=TrainerConfig(steps=300, log_every=10, eval_every=100, eval_batches=4),
        checkpoint=CheckpointConfig(every_steps=100, max_to_keep=3),
    )


def _moe(**kw) -> MoEConfig:
    base = dict(num_experts=16, top_k=2, num_shared=1, expert_dim=64, score_func="sigmoid", route_scale=1.0,
                gamma=1e-2, seq_aux_alpha=1e-4)
    base.update(kw)
    return MoEConfig(**base)


def config() -> ExperimentConfig:
    return aux_free_seq()


def aux_free_seq() -> ExperimentConfig:
    return _base(_moe(), "moe")


def aux_free() -> ExperimentConfig:
    return _base(_moe(seq_aux_alpha=0.0), "moe_aux_free")


def aux_loss() -> ExperimentConfig:
    return _base(_moe(gamma=0.0, seq_aux_alpha=0.0, expert_aux_alpha=1e-2), "moe_aux_loss")


def no_balance() -> ExperimentConfig:
    return _base(_moe(gamma=0.0, seq_aux_alpha=0.0), "moe_no_balance")


PRESETS = {"default": config, "aux_free_seq": aux_free_seq, "aux_free": aux_free, "aux_loss": aux_loss,
           "no_balance": no_balance}

if __name__ == "__main__":
    sys.exit(main(config, presets=PRESETS, prog="python -m recipes.moe"))
