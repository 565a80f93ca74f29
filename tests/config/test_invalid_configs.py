"""Every bad config is refused before anything starts, and the error names the field that is wrong."""

from __future__ import annotations

import pytest
from tests.config.config_helpers import DEEPSPEED_JOB, DEEPSPEED_YAML, MEGATRON_JOB, job, validate_raw

from raytron.config.spec import load_spec
from raytron.config.strict_yaml import ConfigError

DS, MG = DEEPSPEED_JOB, MEGATRON_JOB

# (id, YAML text, expected dotted path) -- traps in the YAML text itself.
YAML_CASES = [
    ("duplicate-top-key", DEEPSPEED_YAML + "name: again\n", "name"),
    ("duplicate-nested-key", DEEPSPEED_YAML.replace("  lr: 0.0003\n", "  lr: 0.0003\n  lr: 0.001\n"), "train.lr"),
    ("duplicate-in-list-item", DEEPSPEED_YAML.replace("  - uri: builtin://python-stdlib\n",
                                                      "  - uri: builtin://python-stdlib\n    uri: x\n"),
     "data.sources[0].uri"),
    ("quoted-float-lr", DEEPSPEED_YAML.replace("lr: 0.0003", "lr: '3e-4'"), "train.lr"),
    ("yaml11-bool-no", DEEPSPEED_YAML.replace("  nodes: 1\n", "  nodes: 1\n  use_gpu: no\n"),
     "resources.use_gpu"),
    ("tab-indent", DEEPSPEED_YAML.replace("  steps: 2", "\tsteps: 2"), ""),
    ("top-level-list", "- name: x\n- engine: deepspeed\n", ""),
    ("empty-document", "", ""),
    ("python-tag", DEEPSPEED_YAML + "fault: !!python/object/apply:os.system [echo]\n", ""),
    ("unclosed-bracket", DEEPSPEED_YAML + "extra: [1, 2\n", ""),
]


@pytest.mark.parametrize("text, path", [c[1:] for c in YAML_CASES], ids=[c[0] for c in YAML_CASES])
def test_yaml_traps_refused(tmp_path, text, path):
    f = tmp_path / "job.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_spec(str(f))
    assert exc.value.path == path, str(exc.value)


# (id, raw job mapping, expected dotted path) -- type traps, ranges, model references, layout rules.
CASES = [
    # --- unknown keys and types
    ("unknown-top-key", job(DS, nmae="x"), "nmae"),
    ("unknown-nested-key", job(DS, train__micro_batch=2), "train.micro_batch"),
    ("bool-yes-for-bool", job(DS, checkpoint__async_save="yes"), "checkpoint.async_save"),
    ("float-for-int", job(DS, resources__workers=4.0), "resources.workers"),
    ("string-for-int", job(DS, train__steps="10"), "train.steps"),
    ("bool-for-int", job(DS, layout__tp=True), "layout.tp"),
    ("nan-lr", job(DS, train__lr=float("nan")), "train.lr"),
    ("engine-case", job(DS, engine="DeepSpeed"), "engine"),
    ("sources-not-list", job(DS, data__sources="builtin://python-stdlib"), "data.sources"),
    ("source-weight", job(DS, data__sources=[{"uri": "builtin://python-stdlib", "weight": -1.0}]),
     "data.sources[0].weight"),
    ("missing-lr", job(DS, train__lr=None), "train.lr"),
    ("keep-too-small", job(DS, checkpoint__keep=1), "checkpoint.keep"),
    ("secret-in-uri", job(DS, checkpoint__uri="s3://AKIA:s3cr3t@bucket/runs"), "checkpoint.uri"),
    ("bad-name", job(DS, name="my run/1"), "name"),
    ("name-dotdot", job(DS, name=".."), "name"),  # would leave the run root
    ("name-dot", job(DS, name="."), "name"),
    ("name-reserved", job(DS, name="_data_cache"), "name"),  # the data cache's folder
    ("name-dash", job(DS, name="-x"), "name"),
    ("name-non-ascii", job(DS, name="café"), "name"),  # isalnum() is true for it; Ray's metrics are ASCII
    ("name-too-long", job(DS, name="x" * 101), "name"),
    ("name-empty", job(DS, name=""), "name"),
    ("seed-too-big", job(DS, train__seed=2**31), "train.seed"),
    ("seed-negative", job(DS, train__seed=-1), "train.seed"),
    ("no-layers", job(DS, model__overrides={"num_layers": 0}), "model.overrides"),
    ("zero-dim", job(DS, model__overrides={"dim": 0}), "model.overrides"),
    ("unknown-tokenizer", job(DS, data__tokenizer="gpt2"), "data.tokenizer"),
    ("empty-field", job(DS, data__sources=[{"uri": "builtin://python-stdlib", "field": " "}]),
     "data.sources[0].field"),
    ("negative-tp", job(DS, layout__tp=0), "layout.tp"),
    ("zero-stage-range", job(DS, layout__zero_stage=5), "layout.zero_stage"),
    ("uneven-nodes", job(DS, resources__nodes=3), "resources.workers"),
    # --- model references
    ("unknown-family", job(DS, model__family="nope"), "model.family"),
    ("unknown-flavor", job(DS, model__flavor="huge"), "model.flavor"),
    ("override-unknown-field", job(DS, model__overrides={"bogus": 1}), "model.overrides.bogus"),
    ("override-wrong-type", job(DS, model__overrides={"num_layers": "4"}), "model.overrides.num_layers"),
    # --- layout rules
    ("product-not-world", job(DS, layout__dp=2), "layout.dp"),
    ("world-not-multiple", job(MG, resources__workers=6, resources__nodes=1), "resources.workers"),
    ("experts-mod-ep", job(DS, layout__ep=3, resources__workers=6, train__global_batch_size=12), "layout.ep"),
    ("ep-exceeds-folded", job(MG, model__flavor="debug-sigmoid", layout__ep=8), "layout.ep"),
    ("ds-ep-divides-dp", job(DS, layout__ep=4, resources__workers=6, train__global_batch_size=12), "layout.ep"),
    ("dense-with-ep", job(DS, model__family="dense"), "layout.ep"),
    ("dense-with-etp", job(MG, model__family="dense", layout__ep=1, layout__etp=2), "layout.etp"),
    ("layers-mod-pp", job(MG, layout__pp=4, layout__tp=2, layout__ep=1, resources__nodes=1), "layout.pp"),
    ("layers-mod-vpp", job(MG, layout__vpp=2), "layout.vpp"),
    ("vpp-without-pp", job(MG, layout__pp=1, layout__vpp=2), "layout.vpp"),
    ("pattern-stages", job(MG, model__family="hybrid", model__flavor="debug-moe", layout__pp=1), "layout.pp"),
    ("kv-heads-mod-tp", job(MG, model__family="dense", layout__tp=4, layout__pp=1, layout__ep=1,
                             resources__nodes=1), "layout.tp"),
    ("linear-heads-mod-tp", job(MG, model__family="hybrid", model__flavor="debug", layout__pp=1, layout__ep=1,
                                model__overrides={"linear_heads": 3, "linear_head_dim": 16}), "layout.tp"),
    ("tp-spans-nodes", job(MG, layout__tp=4, layout__pp=1, layout__ep=1, model__family="dense",
                           model__overrides={"num_kv_heads": 4}, resources__nodes=4), "layout.tp"),
    ("gbs-not-multiple", job(DS, train__global_batch_size=10), "train.global_batch_size"),
    ("gbs-below-one-step", job(DS, train__global_batch_size=4), "train.global_batch_size"),
    ("cp-seq-len", job(MG, layout__cp=2, layout__pp=1, train__seq_len=30), "train.seq_len"),
    ("sp-seq-len", job(MG, train__seq_len=33), "train.seq_len"),
    # all-to-all attention: cp must divide the 4 heads / tp 2 = 2 heads of a TP rank (MegatronSupport.check_model)
    ("cp-heads", job(MG, model__family="hybrid", model__flavor="debug", layout__tp=2, layout__pp=1, layout__ep=1,
                     layout__cp=4, resources__nodes=1), "layout.cp"),
    # --- engine combinations
    ("ds-zero3-moe", job(DS, layout__zero_stage=3), "layout.zero_stage"),
    ("ds-tp", job(DS, layout__tp=2), "layout.tp"),
    ("ds-pp", job(DS, layout__pp=2), "layout.pp"),
    ("ds-cp", job(DS, layout__cp=2), "layout.cp"),
    ("ds-etp", job(DS, layout__etp=2), "layout.etp"),
    ("megatron-zero2", job(MG, layout__zero_stage=2), "layout.zero_stage"),
    ("megatron-zero3", job(MG, layout__zero_stage=3), "layout.zero_stage"),
]


@pytest.mark.parametrize("raw, path", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_invalid_jobs_refused(raw, path):
    with pytest.raises(ConfigError) as exc:
        validate_raw(raw)
    assert exc.value.path == path, str(exc.value)
    message = exc.value.message
    assert "s3cr3t" not in str(exc.value)  # secrets are never echoed
    assert any(w in message for w in ("got", "missing", "unknown", "duplicate")), message  # the bad value
    assert any(w in message for w in ("must", "allowed", "expected", "use", "set", "known", "put", "remove")), message  # the fix


def test_case_count():
    assert len(YAML_CASES) + len(CASES) >= 30


@pytest.mark.parametrize("override, path", [
    ("train.nope=1", "train.nope"),
    ("layout.tp=two", "layout.tp"),
    ("train.lr='3e-4'", "train.lr"),
    ("data.sources[3].uri=x", "data.sources[3].uri"),
    ("novalue", "--set"),
])
def test_bad_overrides_refused(override, path):
    with pytest.raises(ConfigError) as exc:
        validate_raw(DS, [override])
    assert exc.value.path == path, str(exc.value)


def test_bases_are_valid():
    """The bases the cases break are themselves valid, so each case fails for its own reason."""
    for base in (DS, MG):
        _, layout = validate_raw(base)
        assert layout.world_size == base["resources"]["workers"]


def test_storage_checks(tmp_path):
    """`submit` (check_paths=True) refuses missing data and a checkpoint root that cannot be a directory."""
    from raytron.launcher.validate import validate_job

    spec, _ = validate_raw(DS, [f"data.sources[0].uri={tmp_path}/missing/*.txt"])
    with pytest.raises(ConfigError) as exc:
        validate_job(spec, check_paths=True)
    assert exc.value.path == "data.sources[0].uri"
    blocker = tmp_path / "file"
    blocker.write_text("x")
    spec, _ = validate_raw(DS, [f"checkpoint.uri={blocker}/runs"])
    with pytest.raises(ConfigError) as exc:
        validate_job(spec, check_paths=True)
    assert exc.value.path == "checkpoint.uri"
    (tmp_path / "a.txt").write_text("hello")
    spec, _ = validate_raw(DS, [f"data.sources[0].uri={tmp_path}/*.txt", f"checkpoint.uri={tmp_path}/runs"])
    validate_job(spec, check_paths=True)


@pytest.mark.parametrize("override, path, words", [
    # as root, access() says /proc is writable and only the mkdir fails; as another user access() says no
    ("checkpoint.uri=/proc/raytron-runs", "checkpoint.uri", ("cannot create it", "not a writable directory")),
    ("checkpoint.uri=foo://runs", "checkpoint.uri", "Protocol not known: foo"),
    ("data.sources[0].uri=s3://", "data.sources[0].uri", "the root of a whole store"),
])
def test_storage_errors_name_the_field(tmp_path, override, path, words):
    """Storage failures that used to surface as bare fsspec/OS messages name the setting and the fix."""
    from raytron.launcher.validate import validate_job

    spec, _ = validate_raw(DS, [override, f"checkpoint.uri={tmp_path}/runs"] if path != "checkpoint.uri" else [override])
    with pytest.raises(ConfigError) as exc:
        validate_job(spec, check_paths=True)
    message = exc.value.message
    words = (words,) if isinstance(words, str) else words
    assert exc.value.path == path and any(w in message for w in words), str(exc.value)
    assert "use" in message or "set" in message, str(exc.value)


def test_a_data_source_no_filesystem_opens_is_named(tmp_path):
    """An unknown scheme is refused against the source (not later as a damaged data cache)."""
    with pytest.raises(ConfigError) as exc:
        validate_raw(DS, ["data.sources[0].uri=foo://corpus", f"checkpoint.uri={tmp_path}/runs"])
    assert exc.value.path == "data.sources[0].uri" and "Protocol not known: foo" in exc.value.message, str(exc.value)


def test_yaml_merge_keys_and_12_scalars(tmp_path):
    """YAML 1.2 scalars (3e-4 is a float) and merge keys work; a key written beside a merge wins."""
    f = tmp_path / "job.yaml"
    f.write_text(DEEPSPEED_YAML.replace("lr: 0.0003", "lr: 3e-4")
                 .replace("train:\n", "train:\n  <<: {steps: 7, seed: 9}\n"))
    spec = load_spec(str(f))
    assert spec.train.lr == 3e-4 and spec.train.steps == 2 and spec.train.seed == 9
