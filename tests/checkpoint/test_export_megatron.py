"""`raytron export` of a megatron-format checkpoint: stacked experts in reference names, as
parallelism/megatron_state.gather_state writes them (its round trip is tested in tests/parallelism)."""

from __future__ import annotations

import dataclasses

import torch
from safetensors.torch import load_file

from raytron import models
from raytron.launcher.export import main
from raytron.parallelism.checkpoint import CheckpointStore


def _commit_megatron_step(run, model, step: int) -> None:
    store = CheckpointStore(f"{run}/checkpoints")
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {"params": params, "exp_avg": {n: torch.zeros_like(p) for n, p in params.items()},
             "exp_avg_sq": {n: torch.zeros_like(p) for n, p in params.items()}, "buffers": {},
             "meta": {"engine": "megatron", "optimizer_step": step, "has_moments": True, "steps_done": step}}
    rec = store.write_shard(step, "state-00000.pt", state)
    store.commit(step, [rec], {"engine": "megatron", "model": dataclasses.asdict(model.cfg)})


def test_megatron_checkpoint_exports_to_reference(tmp_path):
    torch.manual_seed(0)
    source = models.build("moe", "debug")
    _commit_megatron_step(tmp_path / "run", source, step=5)
    out = tmp_path / "w.safetensors"
    assert main([str(tmp_path / "run"), "--out", str(out)]) == 0
    target = models.build("moe", "debug")
    target.load_state_dict(load_file(str(out)), strict=True)
    tokens = torch.randint(0, source.cfg.vocab_size, (2, 16))
    torch.testing.assert_close(target(tokens), source(tokens), rtol=0, atol=0)


def test_missing_expert_tensor_is_named(tmp_path, capsys):
    torch.manual_seed(0)
    source = models.build("moe", "debug")
    del source.layers[1].mixer.w_up  # a checkpoint that lost one stacked expert tensor
    source.layers[1].mixer.register_buffer("w_up", None)
    _commit_megatron_step(tmp_path / "run", source, step=3)
    assert main([str(tmp_path / "run"), "--out", str(tmp_path / "w.safetensors")]) != 0
    assert "layers.1.mixer.w_up" in capsys.readouterr().err
