"""Mamba-2 byte-level LM on the interpreter's standard-library sources, plus length-generalization post-training.

Default: a tiny pure Mamba-2 stack (each layer: Mamba-2 mixer + small SwiGLU MLP) that trains in ~1-2 min on
2 CPU cores. Presets:
  lengthgen  pretrain at seq_len 64 (cosine schedule ending at step 400), then post-train with a state
             intervention at the schedule's floor LR (Buitrago & Gu 2025: ~0.1% extra steps). Two commands,
             the second resuming the first run directory with overrides (the train-state tree is the same
             in every initial_state mode because the mamba2 layers' `track_states` keeps the buffers):
               python -m recipes.mamba2 --preset lengthgen --run-dir runs/m2_sp
               python -m recipes.mamba2 --preset lengthgen --run-dir runs/m2_sp \
                   --set trainer.steps=500 --set model.layer_pattern.mamba2.initial_state=state_passing
             (or initial_state=fitted_noise; for tbtt also --set data.mode=tbtt). Packed documents are reset
             (document_reset), so the zeros control starts every document from zero. Evaluate with
               python -m tools.length_eval runs/m2_sp --lengths 512,2048
  hybrid     Mamba-2 layers with one attention layer in four (pattern mamba2, mamba2, mamba2, attention).
  gpu_340m   a ~340M Mamba-2 + MLP stack (24 layers of d_model 1024, d_state 128; 343M params with the tied
             embedding) at seq 2048 in bf16 for one H200.
  repro_lengthgen  issue 20's GPU reproduction of Buitrago & Gu: the Mamba-2 130M shape (24 mixer-only layers of
             d_model 768, d_state 128, 32k byte-level BPE) pretrained at seq_len 256 on the Python installation's
             sources and docs, one H200, ~7 min; driven stage by stage by `python -m tools.repro_lengthgen`
             (pretrain, post-train per initial state, evaluation; docs/results/lengthgen.md).
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
from models.kinds import NoFFNConfig
from models.layers import MLPConfig
from models.ssm import Mamba2Config


def config() -> ExperimentConfig:
    return ExperimentConfig(
        name="mamba2",
        model=DecoderConfig(
            vocab_size=258,
            d_model=128,
            num_layers=3,
            layer_pattern=(Mamba2Config(d_state=32, head_dim=32, expand=2, chunk_size=32),),
            ffn_pattern=(MLPConfig(mlp_dim=256),),
            tie_embeddings=True,
            dtype="float32",
        ),
        data=DataConfig(source="text", paths=("stdlib",), seq_len=128, global_batch_size=16, max_bytes=4_000_000),
        optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=30, weight_decay=0.1),
        trainer=TrainerConfig(steps=300, log_every=10, eval_every=100, eval_batches=4),
        checkpoint=CheckpointConfig(every_steps=100, max_to_keep=3),
    )


def lengthgen() -> ExperimentConfig:
    cfg = config()
    cfg.name = "mamba2_lengthgen"
    cfg.data.seq_len = 64
    cfg.trainer.steps = 400
    cfg.optimizer.decay_steps = 400  # fixed, so post-training steps beyond 400 run at the floor LR
    cfg.checkpoint.every_steps = 100
    # The rows are packed: with a document reset every document starts from h_{-1} = 0 and an empty conv
    # window, so the zeros control is the paper's zero-initialised training; an intervention sets the state
    # that opens each row (its first, cut document), one initial state per training sequence as in the paper.
    cfg.model.layer_pattern = tuple(dataclasses.replace(m, document_reset=True) for m in cfg.model.layer_pattern)
    return cfg


def hybrid() -> ExperimentConfig:
    cfg = config()
    cfg.name = "mamba2_hybrid"
    cfg.model.num_layers = 4
    ssm = cfg.model.layer_pattern[0]
    cfg.model.layer_pattern = (*(dataclasses.replace(ssm) for _ in range(3)),
                               AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=32))
    return cfg


def gpu_340m() -> ExperimentConfig:
    cfg = config()
    cfg.name = "mamba2_340m"
    cfg.model = DecoderConfig(
        vocab_size=32768, d_model=1024, num_layers=24,
        layer_pattern=(Mamba2Config(d_state=128, head_dim=64, expand=2, chunk_size=256),),
        ffn_pattern=(MLPConfig(mlp_dim=2048),), tie_embeddings=True, dtype="bfloat16", scan_layers=True,
        # Keeps the named in_proj and MLP outputs, recomputes the rest (docs/benchmarks.md, H100 2026-12-07:
        # 306.2 ms and 29.8 GiB vs 315.3 ms and 14.4 GiB with "full"; "none" needs 162.5 GiB).
        remat_policy="save_named",
    )
    cfg.data = DataConfig(source="text", paths=("stdlib",), seq_len=2048, global_batch_size=16, max_bytes=40_000_000)
    cfg.optimizer = OptimizerConfig(learning_rate=1e-3, warmup_steps=100)
    # cuBLAS rather than XLA's Triton GEMMs: +2.5% tokens/s on this preset (H100, 2026-12-07), +-0 on moe.
    cfg.trainer = TrainerConfig(steps=1000, log_every=10, eval_every=500, eval_batches=2,
                                xla_options={"xla_gpu_enable_triton_gemm": False})
    cfg.model.sample.tokens = 0
    return cfg


REPRO_LENGTHGEN_ROOT = "runs/repro_lengthgen"  # tools.repro_lengthgen's default root: tokenizer.json, pretrain/, ...


def repro_lengthgen() -> ExperimentConfig:
    """Issue 20 (Buitrago & Gu on one H200). 115.5M parameters: 24 mixer-only Mamba-2 layers (d_model 768, expand 2,
    head_dim 64 -> 24 heads, d_state 128, no MLP, as mamba_ssm's 130M), tied 32768-token byte-level BPE embedding,
    bf16 compute, scanned. Pretraining: seq_len 256, 128 rows (32768 tokens/step), 3200 steps = 105M tokens
    (0.780 GFLOP/token: 8.2e16 FLOP, 4.5 min at 300 TFLOP/s), AdamW 3e-3 cosine to 3e-4 at the last step
    (decay_steps None = trainer.steps, so `--set trainer.steps=N` rescales the run; tools.repro_lengthgen's
    post-training pins decay_steps at the pretraining's steps, so it runs at the floor LR), on the
    Python installation's sources and docs (data.paths=python_install), tokenized by the BPE that
    `tools.repro_lengthgen` trains into <root>/tokenizer.json. Unpacked rows (packing=False: each row is one
    window of one document, padded), so every training sequence starts from h_{-1} = 0 exactly as in the
    paper (no document reset is needed). Sizing arithmetic:
    docs/results/lengthgen.md."""
    cfg = config()
    cfg.name = "mamba2_repro_lengthgen"
    steps = 3200
    cfg.model = DecoderConfig(
        vocab_size=32768, d_model=768, num_layers=24,
        layer_pattern=(Mamba2Config(d_state=128, head_dim=64, expand=2, chunk_size=256),),
        ffn_pattern=(NoFFNConfig(),), tie_embeddings=True, dtype="bfloat16", scan_layers=True,
    )
    cfg.model.sample.tokens = 0
    cfg.data = DataConfig(source="text", paths=("python_install",), tokenizer=f"{REPRO_LENGTHGEN_ROOT}/tokenizer.json",
                          seq_len=256, global_batch_size=128, max_bytes=2_000_000_000, packing=False)
    cfg.optimizer = OptimizerConfig(learning_rate=3e-3, warmup_steps=100, min_lr_ratio=0.1, weight_decay=0.1)
    cfg.trainer = TrainerConfig(steps=steps, log_every=25, eval_every=800, eval_batches=16)
    cfg.checkpoint = CheckpointConfig(every_steps=800, max_to_keep=2)
    cfg.run_dir = f"{REPRO_LENGTHGEN_ROOT}/pretrain"
    return cfg


PRESETS = {"default": config, "lengthgen": lengthgen, "hybrid": hybrid, "gpu_340m": gpu_340m,
           "repro_lengthgen": repro_lengthgen}

if __name__ == "__main__":
    sys.exit(recipe_main("mamba2"))  # the same path as `python -m recipes mamba2`
