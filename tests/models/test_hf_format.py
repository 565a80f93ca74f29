"""models/hf_format.py: tiny random transformers Llama/Mixtral models imported into the reference model
give the same logits (fp32, 1e-5), reference models written out load into transformers with the same
logits, and everything without an exact counterpart is refused naming what differs."""

from __future__ import annotations

import pytest
import torch

from raytron import models
from raytron.models.hf_format import (HFFormatError, check_hf_tensors, expected_hf_shapes, from_hf_config,
                                      from_hf_state, to_hf_config, to_hf_state)

transformers = pytest.importorskip("transformers")

TOL = 1e-5
_SHAPE = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
              rms_norm_eps=1e-5)


def _hf_model(kind: str, **extra):
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**_SHAPE, intermediate_size=80, rope_theta=50000.0, **extra)
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**_SHAPE, intermediate_size=80, **extra))
    else:
        cfg = transformers.MixtralConfig(**_SHAPE, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
                                         **extra)
        model = transformers.MixtralForCausalLM(cfg)
    with torch.no_grad():  # norms away from 1 so a dropped or misplaced norm weight shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()


def _reference_from(hf_model) -> models.Transformer:
    cfg = from_hf_config(hf_model.config.to_dict())
    ref = models.Transformer(cfg)
    ref.load_state_dict(from_hf_state(cfg, hf_model.state_dict()))
    return ref.eval()


def _tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind,extra", [
    ("llama", {"num_key_value_heads": 2}),
    ("llama", {"num_key_value_heads": 1, "tie_word_embeddings": True}),
    ("llama", {"num_key_value_heads": 4, "head_dim": 32}),
    ("mixtral", {"num_key_value_heads": 2}),
    ("mistral", {"num_key_value_heads": 2, "sliding_window": 5}),
    ("mixtral", {"num_key_value_heads": 2, "sliding_window": 7}),
])
def test_import_gives_transformers_logits(kind, extra):
    hf = _hf_model(kind, **extra)
    ref = _reference_from(hf)
    x = _tokens(hf.config.vocab_size)
    with torch.no_grad():
        want, got = hf(x).logits, ref(x)
    assert (want - got).abs().max().item() < TOL
    if extra.get("sliding_window"):  # the window really cuts: 24 tokens, windows of 5 and 7
        assert "W" in ref.cfg.layer_pattern() and ref.cfg.window == extra["sliding_window"]
    if extra.get("head_dim"):
        assert ref.cfg.attn_head_dim == 32
    assert ref.cfg.tie_embeddings == bool(extra.get("tie_word_embeddings"))


@pytest.mark.parametrize("family,overrides", [("dense", {}), ("dense", {"tie_embeddings": True}),
                                              ("moe", {}), ("moe", {"num_kv_heads": 4, "rope_theta": 5e5}),
                                              ("dense", {"pattern": "W-W-", "window": 6}),
                                              ("moe", {"pattern": "WEWE", "window": 5})])
def test_export_loads_into_transformers_with_same_logits(family, overrides):
    torch.manual_seed(0)
    ref = models.build(family, "debug", **overrides).eval()
    config = to_hf_config(ref.cfg, eos_token_id=256)
    arch = getattr(transformers, config["architectures"][0])
    hf_cfg = transformers.AutoConfig.for_model(**{k: v for k, v in config.items() if k != "architectures"})
    hf = arch(hf_cfg).eval()
    tensors = to_hf_state(ref.cfg, ref.state_dict())
    result = hf.load_state_dict(transformers_layout(hf, tensors), strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}, result
    x = _tokens(ref.cfg.vocab_size)
    with torch.no_grad():
        assert (hf(x).logits - ref(x)).abs().max().item() < TOL


def transformers_layout(hf_model, tensors: dict) -> dict:
    """Per-expert Mixtral tensors fused the way this transformers release holds them in memory."""
    want = hf_model.state_dict()
    if any(k.endswith("experts.gate_up_proj") for k in want):
        out = {k.replace("block_sparse_moe.gate", "mlp.gate"): v for k, v in tensors.items() if ".experts." not in k}
        for k in want:
            if k.endswith("experts.gate_up_proj"):
                base = k.replace("mlp.experts.gate_up_proj", "block_sparse_moe.experts")
                n = want[k].shape[0]
                gate = torch.stack([tensors[f"{base}.{e}.w1.weight"] for e in range(n)])
                up = torch.stack([tensors[f"{base}.{e}.w3.weight"] for e in range(n)])
                out[k] = torch.cat([gate, up], dim=1)
            elif k.endswith("experts.down_proj"):
                base = k.replace("mlp.experts.down_proj", "block_sparse_moe.experts")
                out[k] = torch.stack([tensors[f"{base}.{e}.w2.weight"] for e in range(want[k].shape[0])])
        return out
    return tensors


def test_config_round_trip():
    for family in ("dense", "moe"):
        cfg = models.get_config(family, "debug", head_dim=32, rope_theta=1e6, norm_eps=1e-6)
        assert from_hf_config(to_hf_config(cfg)) == cfg.replace(init_std=0.02)


# ---- refusals ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("change,named", [
    ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}, "Qwen2ForCausalLM"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_parameters"),
    ({"quantization_config": {"quant_method": "bitsandbytes"}}, "quantization_config"),
])
def test_import_refuses_config_fields(change, named):
    config = {**to_hf_config(models.get_config("dense", "debug")), **change}
    with pytest.raises(HFFormatError, match=named):
        from_hf_config(config)


def test_windowed_configs_map_to_w_layers():
    moe = {**to_hf_config(models.get_config("moe", "debug")), "sliding_window": 4096}
    assert (from_hf_config(moe).layer_pattern(), from_hf_config(moe).window) == ("WEWE", 4096)
    mistral = {**to_hf_config(models.get_config("dense", "debug")), "model_type": "mistral"}
    mistral.pop("sliding_window", None)  # MistralConfig's default window applies
    assert (from_hf_config(mistral).layer_pattern(), from_hf_config(mistral).window) == ("W-W-", 4096)
    assert from_hf_config({**mistral, "sliding_window": None}).layer_pattern() == "*-*-"
    llama = {**to_hf_config(models.get_config("dense", "debug")), "sliding_window": 16}  # Llama ignores it
    assert from_hf_config(llama).layer_pattern() == "*-*-"
    with pytest.raises(HFFormatError, match="sliding_window=0"):
        from_hf_config({**moe, "sliding_window": 0})


def test_import_names_a_tensor_of_the_wrong_shape_or_missing():
    cfg = models.get_config("moe", "debug")
    shapes = dict(expected_hf_shapes(cfg))
    check_hf_tensors(cfg, shapes, "ckpt")
    bad = {**shapes, "model.layers.1.block_sparse_moe.experts.3.w2.weight": (64, 95)}
    named = r"model\.layers\.1\.block_sparse_moe\.experts\.3\.w2\.weight has shape \[64, 95\]"
    with pytest.raises(HFFormatError, match=named):
        check_hf_tensors(cfg, bad, "ckpt")
    missing = {k: v for k, v in shapes.items() if k != "model.norm.weight"}
    with pytest.raises(HFFormatError, match=r"missing \['model\.norm\.weight'\]"):
        check_hf_tensors(cfg, missing, "ckpt")
    check_hf_tensors(cfg, {**shapes, "model.layers.0.self_attn.rotary_emb.inv_freq": (8,)}, "ckpt")  # derived
    with pytest.raises(HFFormatError, match=r"unexpected \['model\.layers\.0\.self_attn\.q_norm\.weight'\]"):
        check_hf_tensors(cfg, {**shapes, "model.layers.0.self_attn.q_norm.weight": (16,)}, "ckpt")


@pytest.mark.parametrize("family,flavor,overrides,named", [
    ("hybrid", "debug", {}, "layer 0 is Gated DeltaNet.*Qwen3-Next.*q_norm, k_norm"),
    ("hybrid", "1b-mamba", {}, "layer 0 is Mamba2"),
    ("dense", "debug", {"pattern": "*-W-", "window": 8}, "layer 2 is sliding-window attention.*every layer"),
    ("hybrid", "debug-moe", {"pattern": "*EBE"}, "layer 2 is block-sparse attention"),
    ("moe", "debug-sigmoid", {"shared_experts": 0, "bias_update_rate": 0.0}, "router=sigmoid"),
    ("moe", "debug", {"norm_topk": False}, "norm_topk=false"),
    ("moe", "debug", {"shared_experts": 1}, "shared_experts=1"),
    ("moe", "debug-capacity", {}, "capacity_factor=1.25"),
    ("moe", "debug-mla", {}, "layer 0 is multi-head latent attention.*DeepseekV3ForCausalLM"),
    ("moe", "debug", {"bias_update_rate": 0.01}, "bias_update_rate=0.01"),
    ("moe", "debug", {"n_group": 2, "topk_group": 1}, "n_group=2, topk_group=1"),
    ("moe", "debug", {"routed_scaling_factor": 2.5}, "routed_scaling_factor=2.5"),
    ("moe", "debug", {"pattern": "*-*E"}, "mixes dense"),
    ("dense", "debug", {"pattern": "*--*"}, "not a stack of attention"),
])
def test_export_refuses_models_without_a_transformers_class(family, flavor, overrides, named):
    cfg = models.get_config(family, flavor, **overrides)
    with pytest.raises(HFFormatError, match=named):
        to_hf_config(cfg)


@pytest.mark.parametrize("arch", ["LlamaConfig", "MistralConfig", "MixtralConfig"])
def test_fields_left_out_of_config_json_take_the_transformers_defaults(arch):
    want = getattr(transformers, arch)()
    config = {k: v for k, v in want.to_dict().items()
              if k not in ("rope_parameters", "rope_theta", "rms_norm_eps", "sliding_window")}
    cfg = from_hf_config(config)
    assert (cfg.rope_theta, cfg.norm_eps) == (want.rope_parameters["rope_theta"], want.rms_norm_eps)
    assert (cfg.window if "W" in cfg.layer_pattern() else None) == getattr(want, "sliding_window", None)
