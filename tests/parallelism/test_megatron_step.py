"""One megatron engine training step on CPU equals the reference model's (fp32, megatron-core's real
schedules over gloo; tests/parallelism/megatron_cpu_schedule.py says what runs and which CPU shims it needs):
LM loss, every rank's every reduced parameter gradient (1e-4 relative), the distributed optimizer's global
gradient norm, and the weights exported back to reference names.

Also the data-parallel overlap of gradient reduction (train.overlap_grad_reduce) against the same reference,
and the expert-parallel all-to-all overlap (train.overlap_moe_comm): megatron-core's combined 1F1B schedule
running the engine's schedule plans (GPTModel.build_schedule_plan, per-layer attention / dispatch / experts /
combine nodes) with the GPU's all-to-all token dispatcher, CUDA streams and events no-ops on CPU.
Two shapes it would get wrong are refused (parallelism/megatron/support.py, _moe_overlap_gaps), both seen here
before the refusal: a pattern ending in a dense MLP trained without the final norm (loss 5.576 vs 5.599,
final-norm gradient 0), and one expert per EP rank failed in backward on the freed dispatched tokens.

Packed documents (data.reset_at_documents: the engine's document ids as megatron's attention_mask) and
context parallelism of hybrid models (parallelism/megatron/cp.py: GDN / Mamba2 states and conv halos passed
between CP ranks; attention heads spread over the CP ranks by all-to-all, each with windowed, block-sparse
and document masks over the whole sequence) against the reference model run on the whole, unsplit
sequence with the same documents: CP1 == CP2 == CP4 by transitivity.

Regression cases, both silent on GPU except for a drifting loss curve:
- MoE with TP and experts replicated over the TP ranks (tp=2, ep=etp=1, sequence parallel): megatron-core
  marks expert weights as expert parameters only when ep > 1, so their gradients were reduced over the
  dense DP group and missed the other TP rank's tokens (parallelism/megatron/spec.py,
  reduce_experts_over_expert_dp).
- Interleaved PP (pp=2, vpp=2, 4 blocks, 4 micro-batches): megatron-core's batched P2P swapped activations
  and gradients between the two ranks in the interleaved steady state (with only pp micro-batches there
  is no steady state, so the bug hides); parallelism/megatron/spec.py turns batch_p2p_comm off there.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.slow

from tests.checkpoint.ckpt_helpers import spawn_ranks  # noqa: E402
from tests.parallelism import megatron_cpu_schedule  # noqa: E402

# moe/debug as moe/debug-mla (the other MLA fields' defaults are that flavor's)
MLA = {"attention": "mla", "num_kv_heads": 4, "q_lora_rank": 32}
SIGMOID = {"num_experts": 8, "moe_ffn_dim": 32, "shared_experts": 1, "router": "sigmoid", "bias_update_rate": 1e-2}
"""moe/debug-sigmoid's model as overrides of moe/debug (the support matrix matches proofs by model config)."""
CASES = {  # name -> (family, model overrides, layout fields); 2 ranks each
    "moe-TP2": ("moe", {}, {"tp": 2}),
    "moe-EP2-no-norm-topk": ("moe", {"norm_topk": False}, {"ep": 2}),  # megatron's pre-softmax router: no renorm
    "dense-PP2v2": ("dense", {"num_layers": 4}, {"pp": 2, "vpp": 2}),
    "moe-PP2v2": ("moe", {"num_layers": 4}, {"pp": 2, "vpp": 2}),
    # "G-*-M-W-" (parallelism/megatron/hybrid.py): TP-split GDN/Mamba2 heads, TP-summed replicated grads
    "hybrid-TP2": ("hybrid", {}, {"tp": 2}),
    "hybrid-PP2": ("hybrid", {"pattern": "G-|*-M-W-"}, {"pp": 2}),  # uneven '|' stages: 1 + 3 layers
    "hybrid-PP2v2": ("hybrid", {}, {"pp": 2, "vpp": 2}),  # interleaved over GDN, attention, Mamba2, window
    # train.overlap_grad_reduce: bucket reductions launched from the backward hooks (after a discarded
    # first step: megatron overlaps only from the second step on), gradients must not change
    "dense-DP2": ("dense", {}, {}),
    "moe-shared-EP2": ("moe", {"shared_experts": 1}, {"ep": 2}),  # megatron's SharedExpertMLP beside the experts
    "moe-mla-TP2": ("moe", MLA, {"tp": 2}),  # multi-head latent attention (parallelism/megatron/mla.py)
    "dense-DP2-overlap": ("dense", {}, {"overlap": "wired"}),
    "moe-DP2-overlap": ("moe", {}, {"overlap": "wired"}),
    # train.overlap_moe_comm at EP2 x DP2 (2 micro-batches a rank: one forward-and-backward overlapped step)
    "moe-EP2-overlap-moe": ("moe", {}, {"ep": 2, "overlap_moe": True}),
    "moe-EP2-overlap-both": ("moe", {}, {"ep": 2, "overlap_moe": True, "overlap": "wired"}),
    "moe-dense-EP2-overlap-moe": ("moe", {"pattern": "*-*E"}, {"ep": 2, "overlap_moe": True}),  # a dense layer
    "moe-shared-EP2-overlap-moe": ("moe", {"shared_experts": 1}, {"ep": 2, "overlap_moe": True}),  # + shared expert
    # GDN, Mamba2 and sliding-window mixers in the per-layer plan (megatron/hybrid.py: backward_dw)
    "hybrid-EP2-overlap-moe": ("hybrid", {"pattern": "GEMEWE*E", "num_experts": 4}, {"ep": 2, "overlap_moe": True}),
}
CASES_4 = {  # 4 ranks
    "moe-TP2xEP2-overlap-moe": ("moe", {}, {"tp": 2, "ep": 2, "overlap_moe": True}),
    # interleaved schedule, 4 micro-batches: 3 steady-state steps overlap a forward with a backward
    "moe-PP2v2xTP2xEP2-overlap-moe": ("moe", {"num_layers": 4}, {"pp": 2, "vpp": 2, "tp": 2, "ep": 2, "overlap_moe": True}),
}
CASES_HYBRID = {  # 2 ranks: packed documents (data.reset_at_documents) and context parallelism
    "hybrid-docs-DP2": ("hybrid", {}, {"docs": True}),  # attention masked, GDN/Mamba2 states and convs reset
    "hybrid-docs-TP2": ("hybrid", {}, {"tp": 2, "docs": True}),
    "dense-CP2-docs": ("dense", {}, {"cp": 2, "docs": True}),
    # CP2: GDN / Mamba2 states and conv halos passed between the ranks, windowed / block-sparse attention
    # on heads/cp heads of the whole sequence (all-to-all); documents also start exactly on CP chunk edges
    "hybrid-CP2": ("hybrid", {}, {"cp": 2}),
    "hybrid-CP2-docs": ("hybrid", {}, {"cp": 2, "docs": True}),
    "hybrid-moe-CP2": ("hybrid", {}, {"cp": 2, "flavor": "debug-moe"}),
    "hybrid-moe-CP2-docs": ("hybrid", {}, {"cp": 2, "flavor": "debug-moe", "docs": True}),
}
CASES_HYBRID_4 = {  # 4 ranks
    # middle CP ranks both receive and send states and halos; documents start on chunk edges; attention's
    # 2 kv heads repeated to 4 (one per CP rank; so are CP2xTP2's, 1 per TP rank, repeated to 2)
    "hybrid-CP4-docs": ("hybrid", {}, {"cp": 4, "docs": True}),
    "hybrid-CP2xTP2-docs": ("hybrid", {}, {"cp": 2, "tp": 2, "docs": True}),  # + Mamba2's B/C gathered over TP
}
OVERLAP_MOE = [name for name, (_, _, fields) in {**CASES, **CASES_4}.items() if fields.get("overlap_moe")]


# MoE routing options (models/moe.py `route`): megatron-core's TopKRouter with them equals the reference.
# Sigmoid routers start from a nonzero routing bias (megatron_cpu_schedule.build_reference), so the bias
# steers the routing; "export" then also compares the bias after megatron-core's update in
# finalize_model_grads with the reference's update_bias, bit for bit. Layout field "z_loss":
# train.router_z_loss_coef.
ROUTER_CASES = {
    # DeepSeek-V3 style: sigmoid scores, normalised top-k, aux-loss-free bias, a shared expert; EP2 x DP2
    "sigmoid-bias-shared-EP2": ("moe", SIGMOID, {"ep": 2}),
    # moe/deepseek-small's router (64 experts, top-6, 2 shared experts, bias rate 1e-3) at debug width; EP2
    "deepseek-small-router-EP2": ("moe", {"router": "sigmoid", "bias_update_rate": 1e-3, "num_experts": 64, "top_k": 6,
                                          "moe_ffn_dim": 16, "shared_experts": 2}, {"ep": 2}),
    # node-limited groups (2 of 4 groups of 2 experts, top-4), routed scaling, z-loss; TP2 with sequence parallel
    "sigmoid-groups-z-TP2": ("moe", {"router": "sigmoid", "bias_update_rate": 0.01, "num_experts": 8, "top_k": 4,
                                     "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5},
                             {"tp": 2, "z_loss": 0.01}),
    # softmax without top-k normalisation, device-limited groups (1 of 2), z-loss; DP2 with 2 micro-batches
    "softmax-groups-z-DP2": ("moe", {"norm_topk": False, "n_group": 2, "topk_group": 1}, {"z_loss": 0.01}),
}


@pytest.fixture(scope="module")
def router_results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("megatron_router") / "results.json"
    spawn_ranks(megatron_cpu_schedule.step_matches_reference, 2, list(ROUTER_CASES.values()), str(out), timeout=500)
    return dict(zip(ROUTER_CASES, json.loads(out.read_text())))


@pytest.mark.parametrize("case", list(ROUTER_CASES))
def test_router_options_match_reference(router_results, case):
    """Loss, every gradient, the gradient norm and the exported weights (routing bias included) after one
    step; for the biased cases the step's bias update really moved the bias."""
    r = router_results[case]
    assert r["bad_grads"] == {} and r["worst_grad_error"] < 1e-4, f"{case}: {r['bad_grads']} {r['worst_grad_error']}"
    megatron_loss, ref_loss = r["loss"]
    assert abs(megatron_loss - ref_loss) < 1e-5, f"{case}: loss {megatron_loss} vs reference {ref_loss}"
    norm, ref_norm = r["grad_norm"]
    assert abs(norm - ref_norm) < 1e-5 * ref_norm, f"{case}: grad norm {norm} vs reference {ref_norm}"
    assert r["export_mismatch"] == [], f"{case}: exported state differs from the reference: {r['export_mismatch']}"
    rate = ROUTER_CASES[case][1].get("bias_update_rate")
    if rate:
        assert r["bias_delta"] == pytest.approx(rate, rel=1e-4), "the reference's bias update moved the bias by the rate"


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("megatron_step") / "results.json"
    spawn_ranks(megatron_cpu_schedule.step_matches_reference, 2, list(CASES.values()), str(out), timeout=500)
    return dict(zip(CASES, json.loads(out.read_text())))


@pytest.fixture(scope="module")
def results_4(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("megatron_step_4") / "results.json"
    spawn_ranks(megatron_cpu_schedule.step_matches_reference, 4, list(CASES_4.values()), str(out), timeout=500)
    return dict(zip(CASES_4, json.loads(out.read_text())))


@pytest.fixture(scope="module")
def results_hybrid(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("megatron_step_hybrid") / "results.json"
    spawn_ranks(megatron_cpu_schedule.step_matches_reference, 2, list(CASES_HYBRID.values()), str(out), timeout=500)
    return dict(zip(CASES_HYBRID, json.loads(out.read_text())))


@pytest.fixture(scope="module")
def results_hybrid_4(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("megatron_step_hybrid_4") / "results.json"
    spawn_ranks(megatron_cpu_schedule.step_matches_reference, 4, list(CASES_HYBRID_4.values()), str(out), timeout=500)
    return dict(zip(CASES_HYBRID_4, json.loads(out.read_text())))


FIXTURE_OF = {**{c: "results_4" for c in CASES_4}, **{c: "results_hybrid" for c in CASES_HYBRID},
              **{c: "results_hybrid_4" for c in CASES_HYBRID_4}}


def _result(request, case: str) -> dict:
    return request.getfixturevalue(FIXTURE_OF.get(case, "results"))[case]


@pytest.mark.parametrize("case", list(CASES) + list(CASES_4) + list(CASES_HYBRID) + list(CASES_HYBRID_4))
def test_step_matches_reference(request, case):
    r = _result(request, case)
    assert r["bad_grads"] == {}, f"{case}: gradients off the reference by > 1e-4 relative, per rank: {r['bad_grads']}"
    assert r["worst_grad_error"] < 1e-4
    megatron_loss, ref_loss = r["loss"]
    assert abs(megatron_loss - ref_loss) < 1e-5, f"{case}: loss {megatron_loss} vs reference {ref_loss}"
    norm, ref_norm = r["grad_norm"]
    assert abs(norm - ref_norm) < 1e-5 * ref_norm, f"{case}: grad norm {norm} vs reference {ref_norm}"
    assert r["export_mismatch"] == [], f"{case}: exported weights differ from the reference: {r['export_mismatch']}"


@pytest.mark.parametrize("case", ["dense-DP2-overlap", "moe-DP2-overlap", "moe-EP2-overlap-both"])
def test_overlap_launches_every_reduction_from_the_backward(results, case):
    """The overlap cases really overlap: when finalize_model_grads comes to wait, every bucket group's
    reduction (dense and expert) is already in flight, launched from the backward hooks."""
    launched = results[case]["launched_early"]
    assert launched and all(launched), launched


@pytest.mark.parametrize("case", OVERLAP_MOE)
def test_overlap_moe_comm_runs_the_engines_schedule_plans(request, case):
    """The overlap cases really ran megatron's combined 1F1B schedule on the engine's plans: one
    GPTModel.build_schedule_plan per micro-batch and chunk, called by MegatronEngine._forward_step as the
    plain path calls the model (tokens and labels [micro, seq], no position ids or mask, nothing else), and
    at least one step ran a forward beside a backward (the first forward and last backward run alone)."""
    r = _result(request, case)
    micro = megatron_cpu_schedule.MICRO, megatron_cpu_schedule.SEQ
    assert len(r["schedule_plans"]) == r["grad_accum"] * r["chunks"], r["schedule_plans"]
    expected = {"input_ids": list(micro), "position_ids": None, "attention_mask": None, "labels": list(micro),
                "others": 0}
    assert all(plan == expected for plan in r["schedule_plans"]), r["schedule_plans"]
    assert [True, True] in r["plan_runs"], r["plan_runs"]


def test_plain_schedule_builds_no_schedule_plans(results):
    assert results["moe-DP2-overlap"]["schedule_plans"] == [] and results["moe-DP2-overlap"]["plan_runs"] == []


def test_without_overlap_reductions_start_at_finalize(results):
    launched = results["dense-DP2"]["launched_early"]
    assert launched and not any(launched), launched

RECOMPUTE_CASES = {  # train.recompute: megatron's core-attention / MLP / full-layer checkpointing and ours
    "dense-DP2": ("dense", {}, {}),  # attention cores and MLPs of the plain transformer
    "hybrid-TP2": ("hybrid", {}, {"tp": 2}),  # GDN and Mamba2 cores, SDPA and masked attention cores, MLPs
    "moe-EP2": ("moe", {}, {"ep": 2}),  # MoE layers recomputed whole under `full`
    "moe-mla-EP2": ("moe", MLA, {"ep": 2}),  # megatron's MLASelfAttention with its core attention recomputed
    "moe-sigmoid-EP2": ("moe", SIGMOID, {"ep": 2}),  # the sigmoid router, its bias and the shared expert
    # CP halves: selective checkpoints each half's core, `full` reruns the layer's state and halo passing
    "hybrid-CP2": ("hybrid", {}, {"cp": 2}),
    # core attention recomputed inside the schedule plan's attention node (train.overlap_moe_comm; last:
    # its CUDA stream shims stay installed in the rank processes)
    "moe-EP2-overlap-moe": ("moe", {}, {"ep": 2, "overlap_moe": True}),
}


@pytest.fixture(scope="module")
def recompute_results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("megatron_recompute") / "results.json"
    spawn_ranks(megatron_cpu_schedule.recompute_matches_none, 2, list(RECOMPUTE_CASES.values()), str(out), timeout=500)
    return dict(zip(RECOMPUTE_CASES, json.loads(out.read_text())))


@pytest.mark.parametrize("case", list(RECOMPUTE_CASES))
@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recompute_keeps_loss_and_gradients(recompute_results, case, mode):
    if mode not in recompute_results[case]:
        pytest.skip("megatron-core refuses full recomputation with train.overlap_moe_comm (engine_gaps too)")
    base, got = recompute_results[case]["none"], recompute_results[case][mode]
    assert got[2] == base[2] > 10
    assert abs(got[0] - base[0]) <= 1e-6, f"{case} recompute={mode}: loss {got[0]} vs {base[0]}"
    assert got[1] <= 1e-6, f"{case} recompute={mode}: gradients differ by up to {got[1]}"
    saved = [r[3] for m, r in recompute_results[case].items() if m != "reference"]  # none, selective[, full]
    assert saved == sorted(saved, reverse=True) and len(set(saved)) == len(saved), (
        f"{case}: elements kept for backward (none, selective, full) {saved}")


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_router_statistics_match_reference(recompute_results, mode):
    """MegatronEngine._router_stats over both ranks equals the reference routers' statistics on the global
    batch: aux loss, routing entropy (recomputed here from the reference's probabilities) and expert load;
    a router rerun by full recomputation in backward does not count twice."""
    aux, load, entropy = recompute_results["moe-EP2"][mode][4:]
    ref_aux, ref_load, ref_entropy = recompute_results["moe-EP2"]["reference"]
    assert entropy == pytest.approx(ref_entropy, rel=1e-5) and 0 < entropy < 1.3863  # below log(4 experts)
    assert aux == pytest.approx(ref_aux, rel=1e-5)
    assert load == pytest.approx(ref_load, abs=1e-9)


@pytest.mark.parametrize("case", ["dense-PP2v2", "moe-PP2v2"])
def test_interleaved_chunks_hold_the_interleaved_layers(results, case):
    """Chunk v of pipeline rank p holds blocks [(v*pp + p) * n, ...) with n = blocks / (pp*vpp): megatron's
    interleaved assignment, read from the built chunks' layer numbers (which the weight mapping uses)."""
    pp, vpp, blocks = 2, 2, 4
    n = blocks // (pp * vpp)
    expected = [[list(range((v * pp + p) * n, (v * pp + p + 1) * n)) for v in range(vpp)] for p in range(pp)]
    assert results[case]["blocks"] == expected
