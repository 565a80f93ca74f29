"""How a reference layer pattern becomes megatron-core TransformerLayers, and what the megatron engine
refuses about it. Pure arithmetic on the model config and the layout (no megatron import), so `plan`
(parallelism/megatron/support.py, the table `plan` reads) and the engine (parallelism/megatron/spec.py) share it.

A megatron TransformerLayer is one sequence mixer followed by one MLP/MoE, each pre-norm residual: the
pattern must be a sequence of (mixer, ffn) pairs, mixer in `*` attention, `W` sliding-window attention,
`B` block-sparse attention, `G` Gated DeltaNet, `M` Mamba2; ffn in `-` MLP, `E` MoE. Block g holds
reference layers 2g (mixer, its norm = `input_layernorm`) and 2g+1 (ffn, its norm = `pre_mlp_layernorm`).
Pipeline stages marked with `|` must fall between blocks; megatron splits evenly, or with its uneven
first/last stage fields, so only splits of that shape are accepted.
"""

from __future__ import annotations

import re

MIXERS = "*WBGM"
FFNS = "-E"
_PAIRS = re.compile(rf"([{re.escape(MIXERS)}][{re.escape(FFNS)}])+")


class UnsupportedArchitecture(ValueError):
    """The reference model uses something this engine cannot reproduce exactly (message says what)."""


def _refuse(field: str, reason: str) -> UnsupportedArchitecture:
    exc = UnsupportedArchitecture(f"{field}: {reason}")
    exc.field, exc.reason = field, reason
    return exc


def blocks(cfg) -> list[tuple[str, str]]:
    """(mixer, ffn) of every megatron layer, in order; raises UnsupportedArchitecture naming the field."""
    whole = cfg.pattern or cfg.layer_pattern()
    for stage, part in enumerate(cfg.stage_patterns()):
        if not _PAIRS.fullmatch(part):
            where = f"stage {stage} ({part!r}) of pattern {whole!r}" if "|" in whole else f"pattern {whole!r}"
            raise _refuse(
                "model.overrides.pattern", f"{where} is not a "
                f"sequence of (mixer, ffn) pairs: the megatron engine maps each mixer ({MIXERS}) followed by "
                f"an MLP or MoE ({FFNS}) onto one megatron layer, and '|' stage marks must fall between pairs")
    pattern = cfg.layer_pattern()
    return [(pattern[i], pattern[i + 1]) for i in range(0, len(pattern), 2)]


def stage_block_counts(cfg) -> list[int] | None:
    """Megatron layers in each '|'-marked stage, or None when the pattern marks no stages."""
    if "|" not in (cfg.pattern or ""):
        return None
    blocks(cfg)
    return [len(part) // 2 for part in cfg.stage_patterns()]


def pipeline_split(cfg, pp: int, vpp: int = 1) -> dict[str, int]:
    """TransformerConfig fields that make megatron's pipeline split equal the pattern's '|' marks
    (empty when the even split already does); raises UnsupportedArchitecture naming the field."""
    num_blocks = len(blocks(cfg))
    counts = stage_block_counts(cfg)
    stages = pp * vpp
    if counts is None or stages == 1:  # without pipelining the marks mean nothing
        if num_blocks % stages:
            raise _refuse(
                "layout.pp", f"pp*vpp = {pp}*{vpp} = {stages} does not divide the model's {num_blocks} megatron "
                f"layers (mixer+ffn pairs); use a divisor of {num_blocks} or mark stages with '|'")
        return {}
    if len(counts) != stages:
        raise _refuse(
            "layout.pp", f"pp*vpp = {stages} but the pattern marks {len(counts)} stages with '|'")
    if len(set(counts)) == 1:
        return {}
    middle = counts[1:-1]
    if vpp > 1 or len(set(middle)) > 1:
        raise _refuse(
            "model.overrides.pattern", f"stages of {counts} megatron layers; megatron splits evenly, or with "
            f"other first/last stages around equal middle ones (evenly with vpp > 1): re-mark the pattern")
    return {"num_layers_in_first_pipeline_stage": counts[0], "num_layers_in_last_pipeline_stage": counts[-1]}


def megatron_pattern_gaps(cfg, layout, precision: str = "bf16", seq_len: int | None = None) -> list[tuple[str, str]]:
    """(field, reason) for the layer-pattern and attention-kind limits of the megatron engine under `layout`
    (and train.precision `precision`: see mla_gaps; train.seq_len: context-parallel chunks)."""
    try:
        kinds = blocks(cfg)
        pipeline_split(cfg, layout.pp, layout.vpp)
    except UnsupportedArchitecture as exc:
        return [(exc.field, exc.reason)]
    mixers = {m for m, _ in kinds}
    gaps = []
    halo = cfg.conv_size - 1  # a CP chunk hands its last conv_size-1 inputs to the next (cp.py)
    if layout.cp > 1 and mixers & set("GM") and seq_len is not None and seq_len // (2 * layout.cp) < halo:
        gaps.append(("train.seq_len", f"got {seq_len}; context parallelism cuts it into 2*cp = {2 * layout.cp} "
                                      f"chunks, each must hold the short convolution's {halo} halo tokens: use "
                                      f"seq_len >= {2 * layout.cp * halo} or a smaller cp"))
    if "M" in mixers and cfg.ssm_state_dim % layout.tp:
        gaps.append(("layout.tp", f"got {layout.tp}; Mamba2's B/C state channels (ssm_state_dim "
                                  f"{cfg.ssm_state_dim}) are split over tp before being gathered, so tp "
                                  f"must divide {cfg.ssm_state_dim}"))
    return gaps + mla_gaps(cfg, layout, precision)


def mla_gaps(cfg, layout, precision: str = "bf16") -> list[tuple[str, str]]:
    """(field, reason) for what the megatron engine cannot run with multi-head latent attention
    (`attention: mla`, parallelism/megatron/mla.py) under `layout` and train.precision `precision`."""
    if cfg.attention != "mla":
        return []
    gaps = [(exc.field, exc.reason) for exc in [mla_model_refusal(cfg)] if exc is not None]
    if layout.cp > 1:
        gaps.append(("layout.cp", f"got {layout.cp}; context parallelism is not mapped for multi-head latent "
                     "attention (attention: mla): use cp: 1"))
    if precision == "fp8":
        gaps.append(("train.precision", "fp8 with attention: mla: megatron-core's MLASelfAttention accepts only its "
                     "own ColumnParallelLinear for the latent down projections, so MLA has no FP8 GEMM path; use "
                     "precision: bf16"))
    return gaps


def mla_model_refusal(cfg) -> UnsupportedArchitecture | None:
    """The layout-independent MLA limit (the engine's check_supported raises it): masked attention layers."""
    masked = sorted({m for m in cfg.layer_pattern() if m in "WB"})
    if cfg.attention != "mla" or not masked:
        return None
    return _refuse("model.overrides.attention", f"mla with {''.join(masked)} layers: the megatron engine maps "
                   "latent attention onto megatron-core's MLASelfAttention for full causal `*` layers only; use "
                   "`*` layers or engine: deepspeed")
