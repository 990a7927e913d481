"""DeepSeek-V3-like small MoE LM on stdlib bytes: first layer dense, the rest MoE (sigmoid gate, shared expert,
aux-loss-free bias balancing + sequence-wise balance loss).

Presets reproduce Wang et al.'s comparison in miniature (compare `train/.../maxvio_batch` in metrics.jsonl and
`python -m tools.plot_moe RUN_DIR`):
  no_balance    gamma 0, no balance loss
  aux_loss      gamma 0, V1/V2 expert-level balance loss (alpha 1e-2)
  aux_free      bias balancing only
  aux_free_seq  bias balancing + V3 sequence-wise loss (alpha 1e-4)   [default]
  limited       aux_free_seq with group-limited routing (16 experts of half width in 4 groups, the best 2
                kept, top-4: the same active parameters); with `--set mesh.expert=4` the groups are the expert
                devices (device-limited, M = 2)
The bias update speed gamma is set per preset: the paper's u = 1e-3 (Wang et al., 1B) for the ~1B presets; the
tiny CPU presets use 1e-2 (docs/notes/moe.md: over their 300 steps a bias moving 1e-3 per step balances too late).
The eval reports MaxVio_global (eval/maxvio_global: MaxVio of the loads over the whole eval set, per MoE layer).
Presets `aux_free_seq_gpu`, `aux_free_gpu`, `aux_loss_gpu`, `no_balance_gpu`, `limited_gpu`: the same comparison at
one-H200 size (376M total / 77M active, 64 experts top-6, equal tokens; one base, `_balance_gpu`), driven by
`python -m tools.repro_moe` (docs/results/moe_balance.md).
Preset `gpu_0p8b`: a DeepSeek-V3-like ~0.8B-parameter model (64 routed experts top-6 + 1 shared, bf16, seq 2048)
for one or several H200s (used by tools.bench_scaling moe).
Presets `deepseek_v3` (tiny, CPU) and `deepseek_v3_gpu` (~0.8B total, one H200): DeepSeek-V3-shaped end to end,
MLA attention (models/mla.py) in every layer, the first layer dense, then shared + routed experts with the
sigmoid gate, group-limited routing and the aux-loss-free bias; the layout `tools.import_hf` gives DeepSeek
checkpoints (tools/hf/deepseek.py).
"""
from __future__ import annotations

import dataclasses
import sys

from axlearn_like.checkpoint import CheckpointConfig
from axlearn_like.cli import recipe_main
from axlearn_like.data import DataConfig
from axlearn_like.optimizers import OptimizerConfig
from axlearn_like.trainer import ExperimentConfig, TrainerConfig
from models.attention import AttentionConfig
from models.decoder import DecoderConfig
from models.layers import MLPConfig
from models.mla import MLAConfig
from models.moe import MoEConfig


def _first_dense(mlp: MLPConfig, moe: MoEConfig, num_moe: int) -> tuple:
    """(mlp, moe, ..., moe): the first layer dense, then num_moe MoE layers (each its own copy)."""
    return (mlp,) + tuple(dataclasses.replace(moe) for _ in range(num_moe))


def _base(moe: MoEConfig, name: str) -> ExperimentConfig:
    return ExperimentConfig(
        name=name,
        model=DecoderConfig(
            vocab_size=258,
            d_model=128,
            num_layers=4,
            layer_pattern=(AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=32),),
            ffn_pattern=_first_dense(MLPConfig(mlp_dim=384), moe, 3),
            tie_embeddings=True,
            dtype="float32",
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


def _balance(variant: str, aux_alpha: float) -> dict:
    """Wang et al.'s comparison as MoEConfig changes on top of a size's aux-loss-free MoE (bias + V3 sequence
    loss): "aux_free_seq" (none), "aux_free" (bias only), "aux_loss" (no bias; V1/V2 expert-level loss of
    weight `aux_alpha`), "no_balance" (neither)."""
    return {"aux_free_seq": {}, "aux_free": {"seq_aux_alpha": 0.0},
            "aux_loss": {"gamma": 0.0, "seq_aux_alpha": 0.0, "expert_aux_alpha": aux_alpha},
            "no_balance": {"gamma": 0.0, "seq_aux_alpha": 0.0}}[variant]


def config() -> ExperimentConfig:
    return aux_free_seq()


def aux_free_seq() -> ExperimentConfig:
    return _base(_moe(**_balance("aux_free_seq", 1e-2)), "moe")


def limited() -> ExperimentConfig:
    moe = _moe(expert_dim=32, top_k=4, num_groups=4, topk_groups=2, device_limited_m=2)
    return _base(moe, "moe_limited")


def aux_free() -> ExperimentConfig:
    return _base(_moe(**_balance("aux_free", 1e-2)), "moe_aux_free")


def aux_loss() -> ExperimentConfig:
    return _base(_moe(**_balance("aux_loss", 1e-2)), "moe_aux_loss")


def no_balance() -> ExperimentConfig:
    return _base(_moe(**_balance("no_balance", 1e-2)), "moe_no_balance")


BALANCE_GPU_ROOT = "runs/moe_balance"  # tools.repro_moe's default root: tokenizer.json, one run dir per preset


def _balance_gpu(variant: str, name: str | None = None, **routing) -> ExperimentConfig:
    """Issue 20's GPU size of the balance comparison (one H200, ~4-5 min a run; docs/results/moe_balance.md):
    9 layers of d_model 768 (GQA 12 heads / 4 KV heads of 64), the first FFN dense (2048), then 8 MoE layers of
    64 routed experts of width 256, top-6, + 1 shared, sigmoid gate, route_scale 2.5; untied 32768-token BPE
    (trained on the corpus by tools.repro_moe into <root>/tokenizer.json); 376M total / 77M active parameters
    (the 25M output matrix included; 0.507 GFLOP/token with attention); bf16 compute and weights with float32
    masters; seq 1024 x 64 rows = 65536 tokens/step, 1200 steps = 79M tokens for every variant (equal tokens;
    4.0e16 FLOP, 2.2 min at 300 TFLOP/s). gamma = 1e-3 (Wang et al.'s u), aux_loss alpha 1e-3. `routing`:
    MoEConfig routing fields (the `limited_gpu` preset); `name` the run's name (default: the variant)."""
    kw = dict(num_experts=64, top_k=6, num_shared=1, expert_dim=256, route_scale=2.5, gamma=1e-3)
    kw.update(_balance(variant, aux_alpha=1e-3))
    kw.update(routing)
    moe = _moe(**kw)
    name = name or variant
    cfg = _base(moe, f"moe_{name}_gpu")
    cfg.model = DecoderConfig(
        vocab_size=32768, d_model=768, num_layers=9,
        layer_pattern=(AttentionConfig(num_heads=12, num_kv_heads=4, head_dim=64),),
        ffn_pattern=_first_dense(MLPConfig(mlp_dim=2048), moe, 8), tie_embeddings=False, dtype="bfloat16",
    )
    cfg.model.sample.tokens = 0
    cfg.data = DataConfig(source="text", paths=("python_install",), tokenizer=f"{BALANCE_GPU_ROOT}/tokenizer.json",
                          seq_len=1024, global_batch_size=64, max_bytes=2_000_000_000)
    cfg.optimizer = OptimizerConfig(learning_rate=1e-3, warmup_steps=100, param_dtype="bfloat16")
    cfg.trainer = TrainerConfig(steps=1200, log_every=10, eval_every=200, eval_batches=16)
    cfg.checkpoint = CheckpointConfig(every_steps=400, max_to_keep=2)
    cfg.run_dir = f"{BALANCE_GPU_ROOT}/{name}"
    return cfg


def aux_free_seq_gpu() -> ExperimentConfig:
    return _balance_gpu("aux_free_seq")


def aux_free_gpu() -> ExperimentConfig:
    return _balance_gpu("aux_free")


def aux_loss_gpu() -> ExperimentConfig:
    return _balance_gpu("aux_loss")


def no_balance_gpu() -> ExperimentConfig:
    return _balance_gpu("no_balance")


def limited_gpu() -> ExperimentConfig:
    """aux_free_seq_gpu with group-limited routing: 8 groups of 8 experts, the best 4 kept (V3's 4 of 8); with
    --set mesh.expert=8 the groups are the expert devices (device-limited, M = 4)."""
    return _balance_gpu("aux_free_seq", name="limited", num_groups=8, topk_groups=4, device_limited_m=4)


def gpu_0p8b() -> ExperimentConfig:
    """~0.82B total / ~0.18B active parameters: 8 layers (first dense, 7 MoE), d_model 1024, 64 routed experts
    of width 512 (top-6, sigmoid gate, aux-loss-free bias + sequence loss) + 1 shared, vocab 32768, seq 2048."""
    moe = _moe(num_experts=64, top_k=6, num_shared=1, expert_dim=512, route_scale=2.5,
               gamma=1e-3)  # Wang et al.'s u at 1B
    cfg = _base(moe, "moe_0p8b")
    cfg.model = DecoderConfig(
        vocab_size=32768,
        d_model=1024,
        num_layers=8,
        layer_pattern=(AttentionConfig(num_heads=8, num_kv_heads=4, head_dim=128),),
        ffn_pattern=_first_dense(MLPConfig(mlp_dim=4096), moe, 7),
        tie_embeddings=False,
        dtype="bfloat16",
    )
    # 32 rows: each expert's grouped GEMM gets ~2x the rows (measured on an H100: 27.9% MFU at 32 vs 25.3% at 16,
    # 55.5 GiB peak; docs/benchmarks.md)
    cfg.data = DataConfig(source="text", paths=("stdlib",), seq_len=2048, global_batch_size=32, max_bytes=40_000_000)
    # bf16 model weights with float32 masters in the optimizer state: the expert weights (6.4x the active ones)
    # are not cast every step (MoE layer fwd+bwd 1.44-1.47x a dense FFN vs 1.54-1.64x with float32 weights;
    # docs/benchmarks.md)
    cfg.optimizer = OptimizerConfig(learning_rate=3e-4, warmup_steps=100, param_dtype="bfloat16")
    cfg.trainer = TrainerConfig(steps=1000, log_every=10, eval_every=500, eval_batches=2)
    cfg.model.sample.tokens = 0
    return cfg


def deepseek_v3() -> ExperimentConfig:
    """Tiny DeepSeek-V3 shape for CPU: 4 layers of MLA (4 heads, KV latent 32, query latent 48, d_n 16 + d_r 8,
    d_v 16), the first FFN dense, then 16 routed experts (4 groups, best 2 kept, top-4, route_scale 2.5) + 1 shared."""
    mla = MLAConfig(num_heads=4, kv_lora_rank=32, q_lora_rank=48, qk_nope_head_dim=16, qk_rope_head_dim=8,
                    v_head_dim=16)
    moe = _moe(num_experts=16, top_k=4, num_groups=4, topk_groups=2, route_scale=2.5)
    cfg = _base(moe, "moe_deepseek_v3")
    cfg.model.layer_pattern = (mla,)
    return cfg


def deepseek_v3_gpu() -> ExperimentConfig:
    """DeepSeek-V3 shape at ~0.8B total / ~0.18B active parameters for one H200 (36 GiB measured: fits an H100 too):
    8 layers, d_model 1024; MLA with 16 heads, KV latent 256, query latent 512, d_n 64 + d_r 32, d_v 64 (V3's
    128 + 64 / 128 halved, so the padded head dim 96 takes cuDNN flash attention); first FFN dense (4096), then 64
    routed experts of width 512 in 8 groups (best 4 kept, top-6, sigmoid, route_scale 2.5, aux-loss-free bias +
    sequence loss) + 1 shared; vocab 32768, seq 2048, bf16."""
    cfg = gpu_0p8b()
    cfg.name = "moe_deepseek_v3_gpu"
    cfg.data.global_batch_size = 16  # the measured setting (gpu_0p8b went to 32 rows after it)
    cfg.model.layer_pattern = (MLAConfig(num_heads=16, kv_lora_rank=256, q_lora_rank=512, qk_nope_head_dim=64,
                                         qk_rope_head_dim=32, v_head_dim=64),)
    cfg.model.ffn_pattern = tuple(dataclasses.replace(f, num_groups=8, topk_groups=4) if isinstance(f, MoEConfig) else f
                                  for f in cfg.model.ffn_pattern)
    return cfg


PRESETS = {"default": config, "aux_free_seq": aux_free_seq, "aux_free": aux_free, "aux_loss": aux_loss,
           "no_balance": no_balance, "limited": limited, "gpu_0p8b": gpu_0p8b, "deepseek_v3": deepseek_v3,
           "deepseek_v3_gpu": deepseek_v3_gpu, "aux_free_seq_gpu": aux_free_seq_gpu, "aux_free_gpu": aux_free_gpu,
           "aux_loss_gpu": aux_loss_gpu, "no_balance_gpu": no_balance_gpu, "limited_gpu": limited_gpu}

if __name__ == "__main__":
    sys.exit(recipe_main("moe"))  # the same path as `python -m recipes moe`
