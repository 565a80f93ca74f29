"""Prepared prefixes: megatron-core reads ours at 32K and >65,535 vocabularies, jobs train on them
without tokenizing again, a prefix from another tokenizer is refused by plan/submit naming both,
and the model's vocabulary follows the tokenizer in plan."""

from __future__ import annotations

import argparse
import io
import json

import numpy as np
import pytest
import yaml

from raytron.data_pipeline import DataError, IndexedDatasetWriter, get_tokenizer, prepare, prepare_for_job
from raytron.launcher import plan
from raytron.config.spec import DataSpec, SourceSpec, spec_from_dict
from raytron.config.strict_yaml import ConfigError
from raytron.launcher.validate import validate_job

from tests.data.datapipe_helpers import make_text_corpus
from tests.data.tokenizer_helpers import tiktoken_ranks, write_descriptor, write_ranks

SEQ = 16
JOB = {"name": "tok-test", "engine": "deepspeed", "model": {"family": "dense", "flavor": "debug"},
       "resources": {"workers": 1, "nodes": 1},
       "train": {"steps": 2, "seq_len": SEQ, "micro_batch_size": 2, "global_batch_size": 2, "lr": 3e-4},
       "checkpoint": {"uri": "runs"}}  # plan reads no checkpoint; tests set a tmp_path where one is written


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Corpus, tiktoken tokenizers with eod at 31999 (vocab 32000) and 70000 (vocab 70001), prefixes."""
    root = tmp_path_factory.mktemp("prep")
    docs = make_text_corpus(root / "corpus", n_docs=10)
    write_ranks(root / "r.tiktoken", tiktoken_ranks())
    toks = {v: write_descriptor(root / f"t{v}.json", "r.tiktoken", {"<|endoftext|>": v - 1}, "<|endoftext|>")
            for v in (32000, 70001)}
    prefixes = {v: str(root / f"p{v}") for v in toks}
    for v, path in toks.items():
        prepare([str(root / "corpus")], prefixes[v], path)
    prepare([str(root / "corpus")], str(root / "pbyte"), "byte")
    return {"root": root, "docs": docs, "toks": toks, "prefixes": prefixes}


def test_megatron_indexed_dataset_reads_our_prefixes(env):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    texts = [env["docs"][p] for p in sorted(env["docs"])]
    for vocab, dtype in ((32000, np.uint16), (70001, np.int32)):
        tok = get_tokenizer(env["toks"][vocab])
        ds = IndexedDataset(env["prefixes"][vocab])
        assert ds.index.dtype == dtype and len(ds) == len(texts)
        for i, text in enumerate(texts):
            np.testing.assert_array_equal(ds[i], np.append(tok.encode(text), tok.eod_id))
        summary = json.loads(open(env["prefixes"][vocab] + ".summary.json").read())
        assert summary["tokenizer"]["fingerprint"] == tok.fingerprint and summary["tokenizer"]["name"] == tok.name


def test_job_trains_on_prefix_like_on_its_text(env, tmp_path):
    tok = env["toks"][32000]
    from_text = prepare_for_job(DataSpec([SourceSpec(str(env["root"] / "corpus"))], tokenizer=tok), SEQ, 3,
                                cache_uri=str(tmp_path / "a"))
    for source in (SourceSpec(env["prefixes"][32000]), SourceSpec(env["prefixes"][32000] + ".idx"),
                   SourceSpec(env["prefixes"][32000], format="indexed")):
        from_prefix = prepare_for_job(DataSpec([source], tokenizer=tok), SEQ, 3, cache_uri=str(tmp_path / "b"))
        assert len(from_prefix.train) == len(from_text.train) > 0
        for i in range(len(from_text.train)):
            np.testing.assert_array_equal(from_prefix.train.sample(i), from_text.train.sample(i))
    assert from_text.manifest["tokenizer_fingerprint"] == get_tokenizer(tok).fingerprint
    with pytest.raises(DataError, match="is a prepared .bin/.idx prefix .* it is not tokenized again"):
        prepare([env["prefixes"][32000] + ".idx"], str(tmp_path / "again"), tok)


def test_unrecorded_prefix_ids_checked_against_vocab(env, tmp_path):
    prefix = str(tmp_path / "megatron_made")
    with IndexedDatasetWriter(prefix, np.int32) as w:  # like preprocess_data.py: no summary.json
        for n in range(4):
            w.add_document(np.array([5, 6, 60000 + n, 7] * 8, dtype=np.int32))
    with pytest.raises(DataError, match=f"{prefix}.bin holds token id 60003, outside the vocabulary of "
                                        f"tokenizer '{env['toks'][32000]}'"):
        prepare_for_job(DataSpec([SourceSpec(prefix)], tokenizer=env["toks"][32000]), SEQ, 1,
                        cache_uri=str(tmp_path / "c"))
    data = prepare_for_job(DataSpec([SourceSpec(prefix)], tokenizer=env["toks"][70001]), SEQ, 1,
                           cache_uri=str(tmp_path / "c"))
    assert len(data.train) > 0


def run_plan(tmp_path, raw) -> tuple[int, str, str]:
    f = tmp_path / "job.yaml"
    f.write_text(yaml.safe_dump({**raw, "checkpoint": {"uri": str(tmp_path / "runs")}}))
    parser = argparse.ArgumentParser()
    plan.add_subparser(parser.add_subparsers())
    out, err = io.StringIO(), io.StringIO()
    return plan.run(parser.parse_args(["plan", str(f)]), out=out, err=err), out.getvalue(), err.getvalue()


def test_plan_and_submit_refuse_prefix_of_another_tokenizer(env, tmp_path):
    tok = env["toks"][32000]
    raw = {**JOB, "data": {"tokenizer": tok, "sources": [{"uri": str(env["root"] / "pbyte")}]}}
    code, out, err = run_plan(tmp_path, raw)
    assert code == plan.EXIT_INVALID and out == ""
    assert "data.sources[0].uri" in err and "prepared with tokenizer 'byte'" in err and f"is '{tok}'" in err
    with pytest.raises(ConfigError, match="prepared with tokenizer 'byte'") as exc:
        validate_job(spec_from_dict(raw), check_paths=True, runnable=True)  # what submit runs
    assert exc.value.path == "data.sources[0].uri"
    raw["data"]["sources"] = [{"uri": str(env["root"] / "missing"), "format": "indexed"}]
    with pytest.raises(ConfigError, match="prepared dataset file not found"):
        validate_job(spec_from_dict(raw), check_paths=True)
    raw["data"]["sources"] = [{"uri": env["prefixes"][32000]}]
    assert run_plan(tmp_path, raw)[0] == 0


def test_plan_vocab_follows_tokenizer(env, tmp_path):
    raw = {**JOB, "data": {"tokenizer": env["toks"][70001], "sources": [{"uri": "builtin://python-stdlib"}]}}
    code, out, err = run_plan(tmp_path, raw)
    assert code == 0, err
    assert "vocab      70016 = tokenizer" in out and "70001 ids (eod 70000, bos none) + 15 padding rows" in out
    assert "replaces the flavor's vocab_size 264" in out
    raw["model"] = {**JOB["model"], "overrides": {"vocab_size": 32000}}
    code, out, err = run_plan(tmp_path, raw)
    assert code == plan.EXIT_INVALID and "model.overrides.vocab_size" in err and "below the 70001 ids" in err
    layout_spec = spec_from_dict({**raw, "model": JOB["model"]})
    from raytron.launcher.vocab import with_tokenizer_vocab

    assert with_tokenizer_vocab(layout_spec).model.overrides["vocab_size"] == 70016
    validate_job(layout_spec)
