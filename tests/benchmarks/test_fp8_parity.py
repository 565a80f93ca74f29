"""benchmarks/megatron/fp8_parity.py's data: real text as byte tokens, EOD per file, refused when short."""

import pytest

from benchmarks.megatron import fp8_parity


def test_token_stream_and_windows(tmp_path):
    (tmp_path / "a.md").write_text("héllo")
    (tmp_path / "b.txt").write_text("world")
    (tmp_path / "skip.bin").write_bytes(b"\x00" * 50)
    stream = fp8_parity.token_stream([str(tmp_path)], 13)
    assert stream.tolist() == [*"héllo".encode(), 256, *b"world", 256]
    (first, second) = fp8_parity.windows(stream, 5, 2, 0)
    assert first.tolist() == stream[:6].tolist() and second.tolist() == stream[6:12].tolist()
    with pytest.raises(SystemExit, match="13 tokens"):
        fp8_parity.token_stream([str(tmp_path)], 100)
