"""`raytron export RUN --format hf --out DIR`: a committed checkpoint becomes a directory that
transformers' AutoModelForCausalLM.from_pretrained loads with the reference model's logits; models
without a transformers class, bad flags and bad paths are refused (exit 2) with nothing written."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from raytron import models
from raytron.launcher.cli import main as cli_main
from raytron.config.spec import load_spec, spec_to_yaml
from raytron.parallelism.checkpoint import CheckpointStore

transformers = pytest.importorskip("transformers")
CONFIG = str(Path(__file__).resolve().parents[2] / "cluster_configs" / "local_debug.yaml")


def make_run(root: Path, name: str, family: str, flavor: str = "debug", **overrides) -> tuple[Path, models.Transformer]:
    """A run directory with config.yaml and one committed step holding a seeded reference model."""
    sets = [f"model.family={family}", f"model.flavor={flavor}", f"checkpoint.uri={root}", "layout.ep=1"]
    sets += [f"model.overrides.{k}={json.dumps(v)}" for k, v in overrides.items()]
    spec = load_spec(CONFIG, sets, name)
    run = root / spec.name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(spec_to_yaml(spec))
    torch.manual_seed(3)
    model = models.build(family, flavor, **overrides)
    store = CheckpointStore(f"{run}/checkpoints")
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    rec = store.write_shard(2, "state-00000.pt", {"params": params, "buffers": {}, "meta": {"steps_done": 2}})
    store.commit(2, [rec], {"engine": "megatron", "model": dataclasses.asdict(model.cfg)})
    return run, model.eval()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_hf")
    return {"dense": make_run(root, "dense", "dense"), "moe": make_run(root, "moe", "moe"),
            "tied": make_run(root, "tied", "dense", tie_embeddings=True),
            "windowed": make_run(root, "windowed", "dense", pattern="W-W-", window=6),
            "hybrid": make_run(root, "hybrid", "hybrid", pattern="*-G-")}


def load_hf(out: Path):
    """from_pretrained(out) in fp32, asserting it reported no missing, unexpected or mismatched tensor."""
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32,
                                                                 output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    return hf.eval()


def _logits_equal(out: Path, model: models.Transformer) -> None:
    hf = load_hf(out)
    x = torch.randint(0, model.cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max().item() < 1e-5


@pytest.mark.parametrize("kind,arch", [("dense", "LlamaForCausalLM"), ("moe", "MixtralForCausalLM"),
                                       ("tied", "LlamaForCausalLM"), ("windowed", "MistralForCausalLM")])
def test_export_reloads_in_transformers_with_same_logits(runs, kind, arch, tmp_path):
    run, model = runs[kind]
    out = tmp_path / "hf"
    assert cli_main(["export", str(run), "--format", "hf", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [arch] and config["dtype"] == "float32"
    assert config["vocab_size"] == 264 and config["eos_token_id"] == 256
    assert config.get("sliding_window") == (6 if kind == "windowed" else None)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 256
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00001.safetensors"}
    _logits_equal(out, model)
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary directory left beside it


def test_sharded_bfloat16_export(runs, tmp_path, capsys):
    run, model = runs["moe"]
    out = tmp_path / "hf"
    assert cli_main(["export", str(run), "--format", "hf", "--out", str(out), "--dtype", "bfloat16",
                     "--max-shard-size", "40KB"]) == 0
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 3 and shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
    from safetensors import safe_open

    index = json.loads((out / "model.safetensors.index.json").read_text())
    for shard in shards:
        with safe_open(str(out / shard), "pt") as f:
            assert all(index["weight_map"][k] == shard and f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    hf = load_hf(out)
    bf16 = models.Transformer(model.cfg)
    bf16.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
    x = torch.randint(0, 264, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(x).logits - bf16.eval()(x)).abs().max().item() < 1e-5
    from transformers import AutoTokenizer  # the byte tokenizer, written beside the weights

    assert AutoTokenizer.from_pretrained(out)("héllo")["input_ids"] == list("héllo".encode())


def test_model_without_a_transformers_class_is_refused_before_anything_is_written(runs, tmp_path, capsys):
    run, _ = runs["hybrid"]
    out = tmp_path / "hf"
    assert cli_main(["export", str(run), "--format", "hf", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "layer 2 is Gated DeltaNet" in err and "Qwen3-Next" in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv,named", [
    (["--format", "onnx"], "invalid choice: 'onnx'"),
    (["--format", "hf", "--dtype", "int8"], "invalid choice: 'int8'"),
    (["--format", "hf", "--max-shard-size", "5 parsecs"], "--max-shard-size"),
    (["--dtype", "bfloat16"], "--dtype applies to --format hf only"),
])
def test_bad_flags_are_refused(runs, tmp_path, capsys, argv, named):
    run, _ = runs["dense"]
    out = tmp_path / "hf"
    try:
        code = cli_main(["export", str(run), "--out", str(out), *argv])
    except SystemExit as exc:  # argparse's refusal of a choice
        code = exc.code
    assert code == 2
    assert named in capsys.readouterr().err
    assert not out.exists()


def test_existing_dir_needs_force_and_checkpoints_are_never_targets(runs, tmp_path, capsys):
    run, model = runs["dense"]
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli_main(["export", str(run), "--format", "hf", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert cli_main(["export", str(run), "--format", "hf", "--out", str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists()
    _logits_equal(out, model)
    inside = run / "checkpoints" / "hf"
    assert cli_main(["export", str(run), "--format", "hf", "--out", str(inside), "--force"]) == 2
    assert "checkpoints directory" in capsys.readouterr().err and not inside.exists()
    afile = tmp_path / "file"
    afile.write_text("x")
    assert cli_main(["export", str(run), "--format", "hf", "--out", str(afile), "--force"]) == 2
    assert "is a file" in capsys.readouterr().err and afile.read_text() == "x"
