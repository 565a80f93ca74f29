"""Every tokenizer kind loads from a file made here and encodes/decodes as its own library does;
save_pretrained output loads in transformers with equal ids; bad paths are refused naming the file."""

from __future__ import annotations

import numpy as np
import pytest

from raytron.data_pipeline import DataError, get_tokenizer
from raytron.data_pipeline.tokenizer import ByteTokenizer, padded_vocab_size, token_dtype
from raytron.data_pipeline.tokenizer_files import LLAMA3_PATTERN, LLAMA3_SPECIALS

from tests.data.tokenizer_helpers import (PROBE, corpus_text, make_hf_json, make_sentencepiece, tiktoken_ranks,
                               write_descriptor, write_ranks)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    text = corpus_text()
    hf = make_hf_json(root / "tokenizer.json", text)
    sp = make_sentencepiece(root / "sp", text)
    ranks_path = write_ranks(root / "ranks.tiktoken", tiktoken_ranks())
    return {"root": root, "text": text, "hf": hf, "sp": sp, "ranks": ranks_path}


def auto_ids(directory, text=PROBE):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))(text, add_special_tokens=False)["input_ids"]


def test_byte_ids_unchanged_and_saved_for_transformers(tmp_path):
    tok = get_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer) and tok is get_tokenizer("byte")  # cached per process
    assert (tok.vocab_size, tok.eod_id, tok.pad_id, tok.bos_id, tok.dtype) == (264, 256, 257, None, np.uint16)
    assert tok.encode("aé").tolist() == [97, 195, 169] and padded_vocab_size(tok) == 264
    tok.save_pretrained(str(tmp_path / "byte"))
    every_byte = PROBE + "".join(map(chr, range(0x800))) + "\U0010ffff"  # all bytes UTF-8 text can hold
    assert auto_ids(tmp_path / "byte", every_byte) == tok.encode(every_byte).tolist()


def test_hf_json_file_and_directory_match_the_library(files):
    for path in (files["root"] / "tokenizer.json", files["root"]):
        tok = get_tokenizer(str(path))
        want = files["hf"].encode(PROBE, add_special_tokens=False).ids
        assert tok.kind == "hf" and tok.encode(PROBE).tolist() == want
        assert [t.tolist() for t in tok.encode_batch([PROBE, "x"])] == [want, files["hf"].encode("x").ids]
        assert tok.decode(tok.encode(PROBE)) == files["hf"].decode(want) == PROBE
        assert (tok.eod_id, tok.bos_id) == (files["hf"].token_to_id("</s>"), files["hf"].token_to_id("<s>"))
    assert get_tokenizer(str(files["root"])).fingerprint == get_tokenizer(str(files["root"] / "tokenizer.json")).fingerprint


def test_sentencepiece_matches_the_library(files, tmp_path):
    tok = get_tokenizer(str(files["root"] / "sp.model"))
    sp = files["sp"]
    assert tok.kind == "sentencepiece" and tok.encode(PROBE).tolist() == sp.encode(PROBE)
    assert tok.decode(tok.encode(PROBE)) == sp.decode(sp.encode(PROBE))
    assert (tok.vocab_size, tok.eod_id, tok.bos_id) == (sp.get_piece_size(), sp.eos_id(), sp.bos_id())
    with pytest.raises(DataError, match="SentencePiece model is not written in transformers format"):
        tok.save_pretrained(str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    make_sentencepiece(tmp_path / "noeos", files["text"], eos_id=-1)
    with pytest.raises(DataError, match=f"tokenizer {tmp_path}/noeos.model has no usable end-of-document"):
        get_tokenizer(str(tmp_path / "noeos.model"))


def test_tiktoken_ranks_use_llama3_pattern_and_specials(files, tmp_path):
    import tiktoken

    ranks = tiktoken_ranks()
    n = len(ranks)
    ref = tiktoken.Encoding("ref", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                            special_tokens={t: n + i for i, t in enumerate(LLAMA3_SPECIALS)})
    tok = get_tokenizer(files["ranks"])
    assert tok.kind == "tiktoken" and tok.encode(PROBE).tolist() == ref.encode_ordinary(PROBE)
    assert tok.decode(tok.encode(PROBE)) == PROBE
    assert (tok.vocab_size, tok.bos_id, tok.eod_id) == (n + 256, n, n + 1)  # Llama-3: 256 specials
    tok.save_pretrained(str(tmp_path / "tt"))
    assert auto_ids(tmp_path / "tt") == tok.encode(PROBE).tolist()


def test_tiktoken_descriptor_names_pattern_and_specials(files, tmp_path):
    import shutil

    shutil.copy(files["ranks"], tmp_path / "r.tiktoken")
    n = len(tiktoken_ranks())
    desc = write_descriptor(tmp_path / "tok.json", "r.tiktoken", {"<|endoftext|>": n}, "<|endoftext|>", r"\S+|\s+")
    tok = get_tokenizer(desc)
    assert (tok.vocab_size, tok.eod_id, tok.bos_id) == (n + 1, n, None)
    assert tok.fingerprint != get_tokenizer(files["ranks"]).fingerprint
    bad = write_descriptor(tmp_path / "bad.json", "r.tiktoken", {"<|x|>": n}, "<|endoftext|>")
    with pytest.raises(DataError, match=f"tokenizer {bad} has no usable end-of-document token"):
        get_tokenizer(bad)


def test_missing_or_non_tokenizer_refused_naming_the_file(tmp_path):
    with pytest.raises(DataError, match=f"tokenizer not found: {tmp_path}/nope"):
        get_tokenizer(str(tmp_path / "nope"))
    (tmp_path / "notes.txt").write_text("just some text\n")
    with pytest.raises(DataError, match=f"{tmp_path}/notes.txt is not a tokenizer"):
        get_tokenizer(str(tmp_path / "notes.txt"))
    (tmp_path / "other.json").write_text('{"a": 1}')
    with pytest.raises(DataError, match="other.json is JSON but neither"):
        get_tokenizer(str(tmp_path / "other.json"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds neither tokenizer.json nor tokenizer.model"):
        get_tokenizer(str(tmp_path / "empty"))


def test_dtype_and_padding_rules():
    assert token_dtype(32000) is np.uint16 and token_dtype(65499) is np.uint16
    assert token_dtype(65500) is np.int32 and token_dtype(128256) is np.int32

    class Sized(ByteTokenizer):
        pad_multiple = 128

    for real, padded in ((32000, 32000), (50257, 50304), (128256, 128256), (519, 640)):
        t = Sized()
        t.vocab_size = real
        assert padded_vocab_size(t) == padded


def test_tokenizer_train_cli_writes_what_transformers_loads(tmp_path, capsys):
    from raytron.launcher.cli import main

    from tests.data.datapipe_helpers import write_jsonl

    write_jsonl(tmp_path / "c.jsonl", [{"text": line} for line in corpus_text(200, seed=3).splitlines()]
                + ["not json", {"other": "x"}])
    out = tmp_path / "bpe"
    argv = ["tokenizer", "train", str(tmp_path / "c.jsonl"), "--vocab-size", "300", "--out", str(out)]
    assert main(argv) == 0
    assert "trained hf tokenizer: 300 ids (eod 0, bos 1) from 200 documents" in capsys.readouterr().out
    tok = get_tokenizer(str(out))
    assert auto_ids(out) == tok.encode(PROBE).tolist() and tok.decode(tok.encode(PROBE)) == PROBE
    assert len(tok.encode(PROBE)) < len(PROBE.encode())  # merges were learned
    assert main(argv) == 2 and "pass --force to overwrite" in capsys.readouterr().err
    assert main(argv[:4] + ["257"] + argv[5:]) == 2 and "--vocab-size must be >= 258" in capsys.readouterr().err
    assert main(argv + ["--force", "--max-documents", "50"]) == 0
    assert get_tokenizer(str(out)).fingerprint != tok.fingerprint  # the cache saw the new file
