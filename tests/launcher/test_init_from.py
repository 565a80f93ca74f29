"""`model.init_from`: plan and submit refuse a Hugging Face checkpoint that is not the job's model
(naming the field or tensor) before anything starts; a job started from one trains on DeepSpeed (CPU,
EP=2, embedded Ray) from exactly those weights, and its export reloads in transformers with the
reference model's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from raytron import models
from raytron.launcher.cli import main

transformers = pytest.importorskip("transformers")
CONFIG = str(Path(__file__).resolve().parents[2] / "cluster_configs" / "local_debug.yaml")
FAST = ["--set", "train.seq_len=64", "--set", "train.global_batch_size=8", "--set", "train.micro_batch_size=2",
        "--set", "data.max_documents=120", "--set", "train.eval_every=0", "--set", "train.warmup_steps=0"]
# the `moe` family's `debug` flavor as a transformers Mixtral (vocabulary: the byte tokenizer's 264)
MIXTRAL = dict(vocab_size=264, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=96, num_local_experts=4, num_experts_per_tok=2, rms_norm_eps=1e-5,
               rope_theta=10000.0, max_position_embeddings=128)


def save_mixtral(path: Path, **changes) -> Path:
    torch.manual_seed(5)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**{**MIXTRAL, **changes}))
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return save_mixtral(tmp_path_factory.mktemp("hf") / "mixtral")


def plan(capsys, init_from, *extra) -> tuple[int, str]:
    capsys.readouterr()
    root = Path(init_from).parent / "runs"  # a run root without checkpoints: init_from is checked
    code = main(["plan", CONFIG, "--set", f"model.init_from={init_from}", "--set", f"checkpoint.uri={root}", *extra])
    return code, capsys.readouterr().err


def test_plan_accepts_the_matching_checkpoint(hf_dir, capsys):
    assert plan(capsys, hf_dir) == (0, "")


def test_shape_mismatch_names_the_override_to_set(tmp_path, capsys):
    code, err = plan(capsys, save_mixtral(tmp_path / "m", intermediate_size=48))
    assert code == 2 and "model.overrides.moe_ffn_dim" in err and "moe_ffn_dim=48" in err, err
    code, err = plan(capsys, save_mixtral(tmp_path / "v", vocab_size=300))
    assert code == 2 and "model.overrides.vocab_size" in err and "vocab_size=300" in err, err
    assert plan(capsys, tmp_path / "m", "--set", "model.overrides.moe_ffn_dim=48")[0] == 0


def test_tensor_mismatch_names_the_tensor(hf_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((hf_dir / "config.json").read_text())
    tensors = load_file(str(hf_dir / "model.safetensors"))
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    save_file(tensors, str(bad / "model.safetensors"))
    code, err = plan(capsys, bad)
    assert code == 2 and "model.init_from" in err and "model.layers.1.self_attn.k_proj.weight has shape [16, 64]" in err
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(bad / "model.safetensors"))
    code, err = plan(capsys, bad)
    assert code == 2 and "missing ['model.layers.1.self_attn.k_proj.weight']" in err, err


def test_unsupported_architecture_and_options_are_refused(hf_dir, tmp_path, capsys):
    other = tmp_path / "qwen"
    other.mkdir()
    config = json.loads((hf_dir / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "qwen3_moe",
                                                   "architectures": ["Qwen3MoeForCausalLM"]}))
    code, err = plan(capsys, other)
    assert code == 2 and "Qwen3MoeForCausalLM" in err and "model.init_from" in err, err
    (other / "config.json").write_text(json.dumps({**config, "sliding_window": 32}))
    (other / "model.safetensors").symlink_to(hf_dir / "model.safetensors")
    code, err = plan(capsys, other)
    assert code == 2 and "model.overrides.pattern" in err and "'WEWE'" in err and "window" in err, err
    assert plan(capsys, other, "--set", "model.overrides.pattern=WEWE", "--set", "model.overrides.window=32")[0] == 0
    (other / "config.json").write_text(json.dumps({**config, "rope_scaling": {"rope_type": "linear", "factor": 2}}))
    code, err = plan(capsys, other)
    assert code == 2 and "rope_scaling" in err, err
    code, err = plan(capsys, tmp_path / "nowhere")
    assert code == 2 and "config.json not found" in err, err
    code, err = plan(capsys, hf_dir, "--set", "model.family=dense", "--set", "layout.ep=1")
    assert code == 2 and "model.family" in err and "MixtralForCausalLM" in err, err


def test_submit_refuses_before_any_worker_starts(tmp_path, capsys):
    bad = save_mixtral(tmp_path / "m", num_hidden_layers=3)
    code = main(["submit", CONFIG, "--name", "x", "--set", f"checkpoint.uri={tmp_path / 'runs'}",
                 "--set", f"model.init_from={bad}", *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "model.overrides.num_layers" in err and "=3" in err, err
    assert not (tmp_path / "runs" / "x").exists()


# ---- end to end (embedded Ray, 2 CPU workers, DeepSpeed ZeRO-2; DeepSpeed-MoE EP=2 for Mixtral) ---------

LLAMA = dict(vocab_size=264, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=172, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=128)
ARCHS = {"mixtral": ("moe", []), "llama": ("dense", ["--set", "layout.ep=1"])}


@pytest.fixture(scope="module", params=sorted(ARCHS))
def trained(request, tmp_path_factory, ray_local):
    """Two steps from a transformers checkpoint at a learning rate too small to move the weights (so the
    trained weights still equal the checkpoint's: proof of the load), then exported both ways."""
    root = tmp_path_factory.mktemp(f"init_{request.param}")
    torch.manual_seed(5)
    if request.param == "llama":
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    else:
        hf = transformers.MixtralForCausalLM(transformers.MixtralConfig(**MIXTRAL))
    hf.save_pretrained(str(root / "hf"))
    family, extra = ARCHS[request.param]
    assert main(["submit", CONFIG, "--name", "warm", "--set", f"checkpoint.uri={root}", "--set", "train.steps=2",
                 "--set", "train.lr=1e-12", "--set", "train.min_lr=0", "--set", "checkpoint.every=2",
                 "--set", f"model.family={family}", "--set", f"model.init_from={root / 'hf'}", *extra, *FAST]) == 0
    assert main(["export", str(root / "warm"), "--format", "hf", "--out", str(root / "exported")]) == 0
    assert main(["export", str(root / "warm"), "--out", str(root / "ref.safetensors")]) == 0
    return root, models.get_config(family, "debug", vocab_size=264)


@pytest.mark.slow
def test_training_starts_from_the_checkpoint_weights(trained):
    from raytron.models.hf_format import from_hf_state

    root, cfg = trained
    want = from_hf_state(cfg, load_file(str(root / "hf" / "model.safetensors")))
    got = load_file(str(root / "ref.safetensors"))
    assert set(got) == set(want)
    for name, value in want.items():
        assert torch.allclose(got[name], value, atol=1e-8), name  # a random init would differ by ~0.02


@pytest.mark.slow
def test_trained_export_reloads_in_transformers_with_reference_logits(trained):
    root, cfg = trained
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(str(root / "exported"), dtype=torch.float32,
                                                                 output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ref = models.Transformer(cfg)
    ref.load_state_dict(load_file(str(root / "ref.safetensors")))
    x = torch.randint(0, 264, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf.eval()(x).logits - ref.eval()(x)).abs().max().item() < 1e-5


def test_a_run_with_a_checkpoint_no_longer_needs_init_from(tmp_path, capsys):
    from raytron.parallelism.checkpoint import CheckpointStore

    gone = tmp_path / "deleted-after-the-first-checkpoint"
    assert plan(capsys, gone)[0] == 2
    store = CheckpointStore(f"{tmp_path}/runs/local-debug/checkpoints")
    store.commit(1, [store.write_shard(1, "state-00000.pt", {"params": {}})], {"engine": "deepspeed"})
    assert plan(capsys, gone) == (0, "")


def test_fsspec_directory_round_trip(tmp_path, capsys):
    """Export to memory://, then plan and load from there (headers and tensors read through fsspec)."""
    import uuid

    from tests.launcher.test_export_hf import make_run

    from raytron.launcher.init_from import reference_state

    run, model = make_run(tmp_path, "m", "moe")
    uri = f"memory://hf-{uuid.uuid4().hex[:8]}/mixtral"
    assert main(["export", str(run), "--format", "hf", "--out", uri, "--max-shard-size", "60KB"]) == 0
    assert plan(capsys, tmp_path / "x", "--set", f"model.init_from={uri}") == (0, "")
    loaded = reference_state(uri, model.cfg)
    assert set(loaded) == set(model.state_dict())
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def test_latent_attention_job_refuses_a_grouped_query_checkpoint(hf_dir, capsys):
    code, err = plan(capsys, hf_dir, "--set", "model.flavor=debug-mla")
    assert code == 2 and "model.init_from" in err and "layer 0 is multi-head latent attention" in err, err
