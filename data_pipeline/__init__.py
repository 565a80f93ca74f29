"""raytron.data_pipeline: corpora from any fsspec URI to packed, blended, exactly-resumable batches.

    data = prepare_for_job(job.data, seq_len, seed, cache_uri)   # driver first (fails early), then workers
    for mb in data.train.micro_batches(cursor, gbs, mbs, dp_rank, dp_size): ...
    cursor = cursor.advance(gbs)

    tok = get_tokenizer("byte" | PATH_OR_URI)                  # the one tokenizer entry point (tokenizer.py)
    tok.save_pretrained(DIR)                                   # transformers.AutoTokenizer loads DIR

torch is imported lazily (only by the batch methods), so `prepare` worker processes start fast.
"""

from .blending import BlendedDataset, blend_schedule
from .cursor import DataCursor
from .errors import DataError
from .indexed import IndexedDatasetWriter, IndexedTokens
from .job import TrainData, cache_key, load_prepared, prepare_for_job
from .packing import PackedDataset
from .prepare import PrepareSummary, prepare
from .sources import BUILTIN_STDLIB, ReadStats, resolve_source
from .tokenizer import ByteTokenizer, Tokenizer, get_tokenizer, padded_vocab_size

__all__ = ["prepare_for_job", "load_prepared", "TrainData", "DataCursor", "ByteTokenizer", "DataError", "PackedDataset",
           "BlendedDataset", "blend_schedule", "prepare", "PrepareSummary", "IndexedDatasetWriter",
           "IndexedTokens", "ReadStats", "resolve_source", "BUILTIN_STDLIB", "get_tokenizer", "cache_key",
           "Tokenizer", "padded_vocab_size"]
