"""The job's tokenizer decides the model's vocabulary: one place for plan, submit and the workers.

`with_tokenizer_vocab(spec)` is the spec whose `model.overrides.vocab_size` is the tokenizer's padded
vocabulary (`data_pipeline.tokenizer.padded_vocab_size`), replacing the flavor's own; a user override
below the tokenizer's ids is a ConfigError. `check_prepared_sources` refuses prepared .bin/.idx sources
recorded with another tokenizer, or whose two files disagree (truncated, bad dtype byte). Both run in
`validate_job`, so `plan` and `submit` refuse before Ray.
"""

from __future__ import annotations

import dataclasses

from ..data_pipeline import DataError, get_tokenizer
from ..data_pipeline.indexed import check_prefix_files, idx_path
from ..data_pipeline.prepared import check_prefix_exists, check_recorded_tokenizer, indexed_prefix
from ..data_pipeline.storage import exists
from ..data_pipeline.tokenizer import Tokenizer, padded_vocab_size
from ..config.spec import JobSpec
from ..config.strict_yaml import ConfigError


def job_tokenizer(spec: JobSpec) -> Tokenizer:
    """The tokenizer `data.tokenizer` names (cached per process), or a ConfigError naming the field."""
    try:
        return get_tokenizer(spec.data.tokenizer)
    except DataError as exc:
        raise ConfigError("data.tokenizer", f"got {spec.data.tokenizer!r}: {exc}") from None


def with_tokenizer_vocab(spec: JobSpec, tokenizer: Tokenizer | None = None) -> JobSpec:
    """`spec` with the model's vocabulary set from the tokenizer (a larger user override is kept)."""
    tok = tokenizer or job_tokenizer(spec)
    given = spec.model.overrides.get("vocab_size")
    if isinstance(given, int) and not isinstance(given, bool):
        if given < tok.vocab_size:
            raise ConfigError("model.overrides.vocab_size",
                              f"got {given}, below the {tok.vocab_size} ids of tokenizer {tok.name!r}: remove it "
                              f"(the vocabulary follows the tokenizer: {padded_vocab_size(tok)} after padding) "
                              f"or set it >= {tok.vocab_size}")
        return spec
    if given is not None:
        return spec  # not an int: the registry's typed override check names it
    overrides = {**spec.model.overrides, "vocab_size": padded_vocab_size(tok)}
    return dataclasses.replace(spec, model=dataclasses.replace(spec.model, overrides=overrides))


def vocab_line(spec: JobSpec, flavor_vocab: int, model_vocab: int, dim: int, tied: bool) -> str:
    """What plan prints about the vocabulary: tokenizer, padding, and what it replaced."""
    tok = job_tokenizer(spec)
    pad = model_vocab - tok.vocab_size
    pad_params = pad * dim * (1 if tied else 2)
    bos = tok.bos_id if tok.bos_id is not None else "none"
    line = (f"vocab      {model_vocab} = tokenizer {tok.name} ({tok.kind}): {tok.vocab_size} ids (eod {tok.eod_id}, "
            f"bos {bos}) + {pad} padding rows ({pad_params:,} padding params)")
    if "vocab_size" in spec.model.overrides:
        return line + "; set by model.overrides.vocab_size"
    if flavor_vocab != model_vocab:
        line += f"; replaces the flavor's vocab_size {flavor_vocab}"
    return line


def check_prepared_sources(spec: JobSpec, tokenizer: Tokenizer, check_paths: bool = False) -> None:
    """Prepared-prefix sources: .bin and .idx consistent, recorded with this tokenizer (and present, with
    `check_paths`)."""
    for i, src in enumerate(spec.data.sources):
        path = f"data.sources[{i}].uri"
        try:
            prefix = indexed_prefix(src.uri, src.format)
            if prefix is None:
                continue
            if check_paths:
                check_prefix_exists(prefix, "prepared source")
            if check_paths or exists(idx_path(prefix)):  # header and sizes: a few small reads
                check_prefix_files(prefix, f"prepare it again (raytron data prepare ... --out {prefix} --force)")
            check_recorded_tokenizer(prefix, tokenizer, "prepared source")
        except DataError as exc:
            raise ConfigError(path, str(exc)) from None
