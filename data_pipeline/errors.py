"""The one error type the data pipeline raises for problems a user must fix before training."""

from __future__ import annotations


class DataError(ValueError):
    """A data source or cache that cannot be used: missing path, no permission, unknown tokenizer,
    too little data for a split. Raised in the driver before any worker starts, so the message must
    name the path or setting at fault (a stack trace from a worker on another node helps nobody).

    Bad *content* (empty files, invalid UTF-8, malformed jsonl lines) is not an error: it is counted
    in `ReadStats` and reported in the prepare summary, because one bad line in a terabyte corpus
    should not stop a job. A source left with no usable document (too few for a job) is an error,
    and its message explains the skips from those counts (see `skips.describe_skips`).
    """
