"""The Hugging Face side of tests/tools/test_hf_deepseek.py; runs in the interop venv (torch + transformers).

    python hf_deepseek_side.py make OUT    layer cases (MLA, MoE) as .npz + tiny DeepSeek-V3 / V2-Lite / V2
                                           models saved float32 and bf16 (sharded) with reference logits
    python hf_deepseek_side.py check DIR.. AutoModelForCausalLM.from_pretrained(DIR) logits -> DIR/hf_logits.npy

Weights are re-drawn larger than transformers' init (std 0.15, norms in [0.5, 1.5], a random
e_score_correction_bias) so that every tensor moves the outputs well above the 1e-4 tolerance.
"""
import json
import sys

import numpy as np
import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
)
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as m2
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as m3

YARN = dict(rope_type="yarn", rope_theta=10000.0, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1)
TOKENS = np.random.default_rng(0).integers(0, 96, (2, 12))

ATTENTION = {  # name: (version, config fields)
    "v3_qlora_yarn": (3, dict(q_lora_rank=24, rope_interleave=True, qk_nope_head_dim=8, qk_rope_head_dim=8,
                              v_head_dim=6,
                              rope_parameters=dict(YARN, factor=4.0, mscale=1.0, mscale_all_dim=1.0))),
    "v3_fullq_plain_vwide": (3, dict(q_lora_rank=None, rope_interleave=False, qk_nope_head_dim=4, qk_rope_head_dim=4,
                                     v_head_dim=12)),
    "v2lite_yarn_packed": (2, dict(q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                                   rope_parameters=dict(YARN, factor=40.0, mscale=0.707, mscale_all_dim=0.707))),
    "v2_qlora": (2, dict(q_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)),
}
MOE = {
    "v3_groups": (3, dict(n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2, norm_topk_prob=True,
                          routed_scaling_factor=2.5, n_shared_experts=1)),
    "v3_nonorm": (3, dict(n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1, norm_topk_prob=False,
                          routed_scaling_factor=1.0, n_shared_experts=2)),
    "v2_group_limited": (2, dict(n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
                                 topk_method="group_limited_greedy", routed_scaling_factor=16.0, n_shared_experts=2)),
    "v2_greedy": (2, dict(n_routed_experts=8, num_experts_per_tok=2, topk_method="greedy", routed_scaling_factor=1.0,
                          n_shared_experts=1)),
}
COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=40, moe_intermediate_size=12, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4,
              v_head_dim=6, first_k_dense_replace=1, rms_norm_eps=1e-5, max_position_embeddings=16384)
MODELS = {
    "v3": (DeepseekV3Config, DeepseekV3ForCausalLM, dict(
        q_lora_rank=16, n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2, n_shared_experts=1,
        routed_scaling_factor=2.5, norm_topk_prob=True,
        rope_parameters=dict(YARN, factor=4.0, mscale=1.0, mscale_all_dim=1.0))),
    "v2_lite": (DeepseekV2Config, DeepseekV2ForCausalLM, dict(
        q_lora_rank=None, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2, topk_method="greedy",
        routed_scaling_factor=1.0, rope_parameters=dict(YARN, factor=4.0, mscale=0.707, mscale_all_dim=0.707))),
    "v2": (DeepseekV2Config, DeepseekV2ForCausalLM, dict(
        q_lora_rank=16, n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2, n_shared_experts=1,
        topk_method="group_limited_greedy", routed_scaling_factor=16.0, tie_word_embeddings=True)),
}


def _redraw(module, std=0.15):
    with torch.no_grad():
        for n, p in module.named_parameters():
            p.uniform_(0.5, 1.5) if n.endswith("norm.weight") else p.normal_(0, std)
        for n, b in module.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.normal_(0, 0.1)


def _mask(seg):
    s = seg.shape[1]
    allowed = torch.tril(torch.ones(s, s, dtype=torch.bool))[None] & (seg[:, :, None] == seg[:, None, :])
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None]


def attention_cases(out):
    for name, (ver, kw) in ATTENTION.items():
        mod = m3 if ver == 3 else m2
        max_len = int(4096 * kw["rope_parameters"]["factor"]) if "rope_parameters" in kw else 4096
        cfg = (DeepseekV3Config if ver == 3 else DeepseekV2Config)(
            hidden_size=32, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=12,
            max_position_embeddings=max_len, **kw)
        cfg._attn_implementation = "eager"
        attn = (mod.DeepseekV3Attention if ver == 3 else mod.DeepseekV2Attention)(cfg, 0).eval()
        _redraw(attn, 0.3)
        b, s = 2, 16
        x = torch.randn(b, s, 32)
        seg = torch.zeros(b, s, dtype=torch.long)
        if "packed" in name:
            seg[0, 6:] = 1
            seg[1, 3:] = 1
            seg[1, 11:] = 2
        pos = torch.zeros(b, s, dtype=torch.long)  # restart at every document
        for i in range(b):
            for t in range(1, s):
                pos[i, t] = 0 if seg[i, t] != seg[i, t - 1] else pos[i, t - 1] + 1
        rope = (mod.DeepseekV3RotaryEmbedding if ver == 3 else mod.DeepseekV2RotaryEmbedding)(cfg)
        with torch.no_grad():
            y, _ = attn(x, position_embeddings=rope(x, pos), attention_mask=_mask(seg))
        np.savez(f"{out}/attn_{name}.npz", x=x.numpy(), y=y.numpy(), seg=seg.numpy(), pos=pos.numpy(),
                 **{f"w.{k}": v.numpy() for k, v in attn.state_dict().items()})
        json.dump(cfg.to_dict(), open(f"{out}/attn_{name}.json", "w"), default=str)


def moe_cases(out):
    for name, (ver, kw) in MOE.items():
        cfg = (DeepseekV3Config if ver == 3 else DeepseekV2Config)(
            hidden_size=16, moe_intermediate_size=12, num_attention_heads=2, **kw)
        moe = (m3.DeepseekV3MoE if ver == 3 else m2.DeepseekV2Moe)(cfg).eval()
        _redraw(moe, 0.3)
        x = torch.randn(2, 24, 16)
        with torch.no_grad():
            y = moe(x)
        weights = {f"w.{k}": v.numpy() for k, v in moe.state_dict().items()}
        np.savez(f"{out}/moe_{name}.npz", x=x.numpy(), y=y.numpy(), **weights)
        json.dump(cfg.to_dict(), open(f"{out}/moe_{name}.json", "w"), default=str)


def _logits(model):
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.float().numpy()


def models(out):
    for name, (cfg_cls, model_cls, kw) in MODELS.items():
        model = model_cls(cfg_cls(**{**COMMON, **kw})).eval()
        _redraw(model)
        model.save_pretrained(f"{out}/{name}/f32")
        model.to(torch.bfloat16).save_pretrained(f"{out}/{name}/bf16", max_shard_size="20KB")  # sharded + index
        for prec in ("f32", "bf16"):
            loaded = model_cls.from_pretrained(f"{out}/{name}/{prec}", dtype=torch.float32).eval()
            np.save(f"{out}/{name}/{prec}/hf_logits.npy", _logits(loaded))
    np.save(f"{out}/tokens.npy", TOKENS)


def check(dirs):
    for d in dirs:
        np.save(f"{d}/hf_logits.npy", _logits(AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()))


if __name__ == "__main__":
    torch.manual_seed(0)
    if sys.argv[1] == "make":
        attention_cases(sys.argv[2])
        moe_cases(sys.argv[2])
        models(sys.argv[2])
    else:
        check(sys.argv[2:])
