"""Reference model <-> Hugging Face transformers checkpoints (config.json + state dict), exact or refused.

Three transformers classes compute a reference model exactly:
- `LlamaForCausalLM` for dense models, layer pattern `*-` repeated: one Llama decoder layer per block
  (input_layernorm + self_attn, post_attention_layernorm + mlp), RoPE in the rotate-half layout of both.
- `MistralForCausalLM` for the same with every attention layer sliding-window (`W-` repeated): its
  `sliding_window` lets a query see the `window` newest keys, itself included, as raytron's `W` layers.
- `MixtralForCausalLM` for MoE models, pattern `*E` (or `WE`, windowed) repeated, with a softmax router
  whose top-k weights are renormalised (Mixtral's router always does that), dropless, no shared experts,
  no routing bias.
Everything else is refused by `export_problem` with the reason (models/hf_refusals.py).

Tensors are written in the layout every transformers release reads: Mixtral experts one by one
(`block_sparse_moe.experts.{e}.w1/w2/w3`, what transformers 5 itself saves and converts on load).
Import also takes transformers 5's fused in-memory layout (`mlp.experts.gate_up_proj`, `down_proj`).
transformers is never imported here: config.json is plain JSON.
"""

from __future__ import annotations

import re

import torch

from .config import ModelConfig
from .hf_refusals import export_problem, import_problems

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM"}
# what each transformers config class assumes for a field config.json leaves out
_DEFAULT_WINDOW = {"mistral": 4096, "mixtral": None}
_DEFAULT_THETA = {"llama": 10000.0, "mistral": 10000.0, "mixtral": 1e6}
_DEFAULT_EPS = {"llama": 1e-6, "mistral": 1e-6, "mixtral": 1e-5}
_ATTN = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
_MLP = {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"}
_EXPERT = {"w_gate": "w1", "w_down": "w2", "w_up": "w3"}  # Mixtral's names


class HFFormatError(ValueError):
    """A model or checkpoint that has no exact counterpart on the other side (the message says why)."""


def hf_model_type(cfg: ModelConfig) -> str:
    """`llama`, `mistral` or `mixtral`, or HFFormatError naming what no transformers class computes."""
    problem = export_problem(cfg)
    if problem:
        raise HFFormatError(problem)
    if cfg.num_experts:
        return "mixtral"
    return "mistral" if "W" in cfg.layer_pattern() else "llama"


def to_hf_config(cfg: ModelConfig, *, dtype: str = "float32", bos_token_id: int | None = None,
                 eos_token_id: int | None = None, pad_token_id: int | None = None,
                 max_position_embeddings: int = 4096) -> dict:
    """config.json of the transformers model that computes `cfg`. Both `rope_theta` (transformers 4)
    and `rope_parameters` (5), both `torch_dtype` (4) and `dtype` (5), so either release reads it."""
    kind = hf_model_type(cfg)
    out = {
        "architectures": [ARCHITECTURES[kind]], "model_type": kind,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "num_hidden_layers": len(cfg.layer_pattern()) // 2,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.attn_head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "max_position_embeddings": max_position_embeddings, "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0, "initializer_range": cfg.init_std, "use_cache": True,
        "bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id,
        "torch_dtype": dtype, "dtype": dtype,
    }
    window = cfg.window if "W" in cfg.layer_pattern() else None
    if kind == "llama":
        out.update(intermediate_size=cfg.ffn_dim, attention_bias=False, mlp_bias=False, pretraining_tp=1)
    elif kind == "mistral":
        out.update(intermediate_size=cfg.ffn_dim, sliding_window=window)
    else:
        out.update(intermediate_size=cfg.moe_ffn_dim, num_local_experts=cfg.num_experts,
                   num_experts_per_tok=cfg.top_k, router_jitter_noise=0.0, sliding_window=window,
                   output_router_logits=False, router_aux_loss_coef=0.001)
    return out


def name_map(cfg: ModelConfig) -> list[tuple[str, int | None, str]]:
    """(reference name, expert index or None, transformers name) of every tensor the checkpoint holds;
    the one place both directions take their names from."""
    kind = hf_model_type(cfg)
    out = [("embed.weight", None, "model.embed_tokens.weight"), ("norm.weight", None, "model.norm.weight")]
    if not cfg.tie_embeddings:
        out.append(("output.weight", None, "lm_head.weight"))
    for block in range(len(cfg.layer_pattern()) // 2):
        a, f, hf = f"layers.{2 * block}", f"layers.{2 * block + 1}", f"model.layers.{block}"
        out += [(f"{a}.norm.weight", None, f"{hf}.input_layernorm.weight"),
                (f"{f}.norm.weight", None, f"{hf}.post_attention_layernorm.weight")]
        out += [(f"{a}.mixer.{ours}.weight", None, f"{hf}.self_attn.{theirs}.weight") for ours, theirs in _ATTN.items()]
        if kind != "mixtral":
            out += [(f"{f}.mixer.{ours}.weight", None, f"{hf}.mlp.{theirs}.weight") for ours, theirs in _MLP.items()]
            continue
        out.append((f"{f}.mixer.router.weight", None, f"{hf}.block_sparse_moe.gate.weight"))
        out += [(f"{f}.mixer.{ours}", e, f"{hf}.block_sparse_moe.experts.{e}.{theirs}.weight")
                for ours, theirs in _EXPERT.items() for e in range(cfg.num_experts)]
    return out


def to_hf_state(cfg: ModelConfig, ref: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reference state dict -> the transformers class's checkpoint tensors (tied output omitted)."""
    return {hf: ref[name] if e is None else ref[name][e] for name, e, hf in name_map(cfg)}


def from_hf_config(config: dict, source: str = "config.json") -> ModelConfig:
    """The reference ModelConfig of a Llama, Mistral or Mixtral config.json; HFFormatError naming each
    field that makes the checkpoint compute something else."""
    problems = import_problems(config)
    if problems:
        raise HFFormatError(f"{source}: " + "; ".join(problems))
    model_type, heads = config["model_type"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = config.get("rope_parameters") or {}
    fields = dict(vocab_size=config["vocab_size"], dim=config["hidden_size"], num_layers=config["num_hidden_layers"],
                  num_heads=heads, num_kv_heads=config.get("num_key_value_heads") or heads,
                  head_dim=0 if head_dim * heads == config["hidden_size"] else head_dim,
                  rope_theta=float(rope.get("rope_theta", config.get("rope_theta", _DEFAULT_THETA[model_type]))),
                  norm_eps=float(config.get("rms_norm_eps", _DEFAULT_EPS[model_type])),
                  tie_embeddings=bool(config.get("tie_word_embeddings", False)))
    if model_type == "mixtral":
        fields.update(num_experts=config["num_local_experts"], top_k=config["num_experts_per_tok"],
                      moe_ffn_dim=config["intermediate_size"], router="softmax", norm_topk=True)
    else:
        fields.update(ffn_dim=config["intermediate_size"])
    window = config.get("sliding_window", _DEFAULT_WINDOW[model_type]) if model_type in _DEFAULT_WINDOW else None
    if window is not None:  # LlamaForCausalLM ignores the key
        fields.update(window=window, pattern=("WE" if model_type == "mixtral" else "W-") * fields["num_layers"])
    try:
        return ModelConfig(**fields)
    except ValueError as exc:
        raise HFFormatError(f"{source}: {exc}") from None


_FUSED = re.compile(r"^(model\.layers\.\d+)\.mlp\.(gate\.weight|experts\.gate_up_proj|experts\.down_proj)$")


def unfuse(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5's in-memory Mixtral tensors (`mlp.gate`, `mlp.experts.gate_up_proj` [E, 2F, D]
    with gate rows first, `mlp.experts.down_proj` [E, D, F]) -> the per-expert layout; others unchanged
    but RoPE's `rotary_emb.inv_freq`, a buffer older checkpoints saved that RoPE recomputes from
    rope_theta. Works on meta tensors too (header checks)."""
    out = {}
    for name, t in hf.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        m = _FUSED.match(name)
        if not m:
            out[name] = t
            continue
        base, what = f"{m.group(1)}.block_sparse_moe", m.group(2)
        if what == "gate.weight":
            out[f"{base}.gate.weight"] = t
        elif what == "experts.down_proj":
            out.update({f"{base}.experts.{e}.w2.weight": w for e, w in enumerate(t.unbind(0))})
        else:
            gate, up = t.chunk(2, dim=1)
            out.update({f"{base}.experts.{e}.w1.weight": w for e, w in enumerate(gate.unbind(0))})
            out.update({f"{base}.experts.{e}.w3.weight": w for e, w in enumerate(up.unbind(0))})
    return out


def expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor the checkpoint of `cfg` holds (per-expert layout)."""
    from .transformer import Transformer

    with torch.device("meta"):
        ref = Transformer(cfg).state_dict()
    return {k: tuple(v.shape) for k, v in to_hf_state(cfg, ref).items()}


def check_hf_tensors(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """HFFormatError naming the first missing, unexpected or wrongly shaped tensor of a checkpoint."""
    with torch.device("meta"):
        got = {k: tuple(v.shape) for k, v in unfuse({k: torch.empty(s) for k, s in shapes.items()}).items()}
    if cfg.tie_embeddings:
        got.pop("lm_head.weight", None)  # some tied checkpoints store the shared matrix twice
    want = expected_hf_shapes(cfg)
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise HFFormatError(f"{source}: tensors do not match the model of config.json: missing "
                            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected "
                            f"{extra[:5]}{' ...' if len(extra) > 5 else ''}")
    for name, shape in want.items():
        if got[name] != shape:
            raise HFFormatError(f"{source}: tensor {name} has shape {list(got[name])}, the model of "
                                f"config.json needs {list(shape)}")


def from_hf_state(cfg: ModelConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Llama/Mistral/Mixtral checkpoint's tensors -> the reference state dict of `cfg` (fp32; the router's
    `expert_bias` zeros, as no transformers MoE has one). Tensors are checked first by name and shape."""
    hf = unfuse(hf)
    check_hf_tensors(cfg, {k: tuple(v.shape) for k, v in hf.items()}, "checkpoint")
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, torch.Tensor]] = {}
    for name, e, hf_name in name_map(cfg):
        if e is None:
            out[name] = hf[hf_name].float()
        else:
            experts.setdefault(name, {})[e] = hf[hf_name].float()
    out.update({name: torch.stack([per[e] for e in range(len(per))]) for name, per in experts.items()})
    if cfg.tie_embeddings:
        out["output.weight"] = out["embed.weight"]
    for layer, kind in enumerate(cfg.layer_pattern()):
        if kind == "E":
            out[f"layers.{layer}.mixer.router.expert_bias"] = torch.zeros(cfg.num_experts)
    return out
