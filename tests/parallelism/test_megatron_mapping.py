"""Reference <-> megatron weight mapping.

1. Pure sharding arithmetic (no megatron model): for every rank of TP/PP/VPP/EP/ETP layouts, the
   reference is cut into megatron shards and reassembled exactly.
2. Megatron-core on CPU, one process: the real GPTModel built from our spec has exactly the mapped
   parameter names and shapes, computes the reference's per-token loss in fp32 and, after backward
   (LM loss + reference aux loss), the reference's gradients.

CPU shim (test-only, `cpu_megatron` fixture): megatron-core's RotaryEmbedding moves its table to
`torch.cuda.current_device()`; the fixture points that at "cpu". Everything else is unmodified
megatron-core 0.16.1 (the MoE uses the all-gather dispatcher on CPU: the all-to-all one needs CUDA streams).
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from raytron import models
from raytron.parallelism.layout import ParallelLayout
from raytron.parallelism.megatron.mapping import ChunkCoords, chunk_pieces, from_megatron, tied_aliases, to_megatron

from tests.checkpoint.ckpt_helpers import free_port

pytest.importorskip("megatron.core")


def _shapes(model) -> dict:
    return {k: v.shape for k, v in model.state_dict().items()}


def _blocks(num_blocks: int, pp: int, vpp: int, pp_rank: int, v: int) -> tuple[int, ...]:
    per = num_blocks // (pp * vpp)
    start = v * pp * per + pp_rank * per  # megatron's interleaved assignment
    return tuple(range(start, start + per))


_MODELS = [("dense", "debug", {}), ("moe", "debug", {}), ("moe", "debug", {"shared_experts": 1}),
           ("dense", "debug", {"num_layers": 4, "tie_embeddings": True}),
           ("hybrid", "debug", {}), ("hybrid", "debug-moe", {}),  # G/*/M/W and G/B/* mixers
           ("moe", "debug-mla", {}), ("moe", "debug-mla", {"q_lora_rank": 0})]  # latent attention
_LAYOUTS = [(1, 1, 1, 1, 1), (2, 1, 1, 1, 1), (1, 2, 1, 1, 1), (2, 2, 1, 2, 1), (1, 2, 2, 2, 2), (2, 1, 1, 4, 1)]


def _fits(family, flavor, overrides, layout) -> bool:
    """Stages divide the blocks, and expert parallelism only for models with experts."""
    tp, pp, vpp, ep, etp = layout
    cfg = models.get_config(family, flavor, **overrides)
    return (len(cfg.layer_pattern()) // 2) % (pp * vpp) == 0 and (ep == 1 or cfg.num_experts > 0)


@pytest.mark.parametrize("family,flavor,overrides,tp,pp,vpp,ep,etp", [
    (*model, *layout) for model in _MODELS for layout in _LAYOUTS if _fits(*model, layout)])
def test_sharding_round_trip(family, flavor, overrides, tp, pp, vpp, ep, etp):
    torch.manual_seed(0)
    ref = models.build(family, flavor, **overrides)
    cfg = ref.cfg
    blocks = len(cfg.layer_pattern()) // 2
    parts = []
    for pp_rank in range(pp):
        for v in range(vpp):
            for tp_rank in range(tp):
                for ep_rank in range(ep):
                    for etp_rank in range(etp):
                        c = ChunkCoords(_blocks(blocks, pp, vpp, pp_rank, v), pre_process=pp_rank == 0 and v == 0,
                                        post_process=pp_rank == pp - 1 and v == vpp - 1, tp=tp, tp_rank=tp_rank,
                                        ep=ep, ep_rank=ep_rank, etp=etp, etp_rank=etp_rank)
                        pieces = chunk_pieces(cfg, c)
                        parts.append((pieces, to_megatron(ref.state_dict(), pieces)))
    back = from_megatron(parts, _shapes(ref), aliases=tied_aliases(cfg))
    for name, value in ref.state_dict().items():
        assert torch.equal(back[name], value), name


def test_missing_shard_is_refused():
    ref = models.build("dense", "debug")
    c = ChunkCoords((0, 1), pre_process=True, post_process=True, tp=2, tp_rank=0)
    pieces = chunk_pieces(ref.cfg, c)
    with pytest.raises(ValueError, match="not fully covered"):
        from_megatron([(pieces, to_megatron(ref.state_dict(), pieces))], _shapes(ref))


@pytest.fixture(scope="module")
def cpu_megatron():
    import torch.distributed as dist
    from megatron.core import parallel_state

    mp = pytest.MonkeyPatch()
    if not dist.is_initialized():  # a port free now, not a fixed one another process may hold (EADDRINUSE in CI)
        mp.setenv("MASTER_ADDR", "127.0.0.1")
        mp.setenv("MASTER_PORT", str(free_port()))
    mp.setattr(torch.cuda, "current_device", lambda: "cpu")  # RotaryEmbedding's device (see module doc)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(create_gloo_process_groups=False)
    yield
    parallel_state.destroy_model_parallel()
    if created:
        dist.destroy_process_group()
    mp.undo()


def _megatron_twin(family: str, flavor: str, seed: int = 0, precision: str = "bf16", **overrides):
    from raytron.parallelism.megatron.engine import chunk_coords
    from raytron.parallelism.megatron.spec import build_model_chunks, transformer_config

    torch.manual_seed(seed)
    ref = models.build(family, flavor, **overrides)
    layout = ParallelLayout(world_size=1)
    tcfg = transformer_config(ref.cfg, layout, on_gpu=False, aux_loss_coef=0.01)
    (model,) = build_model_chunks(ref.cfg, tcfg, seq_len=32, precision=precision)
    pieces = chunk_pieces(ref.cfg, chunk_coords(model, layout))
    params = dict(model.named_parameters())
    assert set(params) == set(pieces)
    with torch.no_grad():
        for name, value in to_megatron(ref.state_dict(), pieces).items():
            assert params[name].shape == value.shape, name
            params[name].copy_(value)
    return ref, model, pieces


@pytest.mark.parametrize("family,flavor,overrides", [
    ("dense", "debug", {}), ("moe", "debug", {}), ("hybrid", "debug", {}), ("hybrid", "debug-moe", {}),
    ("moe", "debug-mla", {}), ("moe", "debug-mla", {"q_lora_rank": 0})])  # MLA: megatron_mla.py
def test_megatron_cpu_matches_reference(cpu_megatron, family, flavor, overrides):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    ref, model, pieces = _megatron_twin(family, flavor, **overrides)
    tokens = torch.randint(0, ref.cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
    per_token = model(tokens[:, :-1], None, None, labels=tokens[:, 1:])
    per_token.mean().backward()
    logits = ref(tokens[:, :-1])
    ref_per_token = F.cross_entropy(logits.reshape(-1, ref.cfg.vocab_size), tokens[:, 1:].reshape(-1),
                                    reduction="none").view(2, 32)
    aux = sum(ref.aux_losses()) if ref.aux_losses() else 0.0
    (ref_per_token.mean() + 0.01 * aux).backward()
    torch.testing.assert_close(per_token, ref_per_token, rtol=1e-5, atol=1e-5)
    grads = from_megatron([(pieces, {n: p.grad for n, p in model.named_parameters()})],
                          {k: v.shape for k, v in ref.named_parameters()})
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("family,flavor,overrides", [("dense", "debug", {"ffn_dim": 192}), ("moe", "debug", {})])
def test_megatron_fp8_layers_on_cpu(cpu_megatron, family, flavor, overrides):
    """train.precision fp8: the same parameters (so checkpoints), FP8 modules in the transformer linears
    and experts, and a loss/gradients near the exact reference (the fake-quantised CPU path of ops/fp8.py)."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from raytron.parallelism.megatron.fp8 import FP8ColumnParallelLinear, FP8GroupedMLPExperts, FP8RowParallelLinear

    ref, model, pieces = _megatron_twin(family, flavor, precision="fp8", **overrides)
    kinds = {type(m) for m in model.decoder.modules()}
    assert {FP8ColumnParallelLinear, FP8RowParallelLinear} <= kinds
    assert (FP8GroupedMLPExperts in kinds) == (family == "moe")
    assert type(model.output_layer).__name__ == "ColumnParallelLinear"  # logits stay in the model dtype
    tokens = torch.randint(0, ref.cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
    loss = model(tokens[:, :-1], None, None, labels=tokens[:, 1:]).mean()
    loss.backward()
    ref_loss = F.cross_entropy(ref(tokens[:, :-1]).reshape(-1, ref.cfg.vocab_size), tokens[:, 1:].reshape(-1))
    ref_loss.backward()
    assert abs(float(loss) - float(ref_loss)) < 0.01 * float(ref_loss)
    grads = from_megatron([(pieces, {n: p.grad for n, p in model.named_parameters()})],
                          {k: v.shape for k, v in ref.named_parameters()})
    for name in ("layers.0.mixer.wq.weight", "layers.1.mixer.w_down.weight") if family == "dense" else ():
        g, want = grads[name], dict(ref.named_parameters())[name].grad
        assert float((g - want).norm() / want.norm()) < 0.2, name
