"""Why documents were skipped, in words a user can act on: the kinds counted in `ReadStats`, one
example location each, and the setting to change (a `prepare` flag or a job's config key).

Used by the refusals for "no/too few usable documents" and by the prepare summary, so a corpus
whose text sits under another field, or that is binary, says so instead of "(skipped: 300)".
"""

from __future__ import annotations

from dataclasses import dataclass

_KIND_WORDS = {
    "missing_field": "record(s) without the text field",
    "invalid_utf8": "invalid UTF-8",
    "malformed_lines": "line(s) not JSON",
    "empty_documents": "empty document(s)",
    "empty_files": "empty file(s)",
    "unreadable_files": "unreadable file(s)",
}


@dataclass(frozen=True)
class FixOptions:
    """Where the user of this caller sets the reader options: `prepare` flags or job config keys."""

    field: str = "--field"
    format: str = "--format"

    @classmethod
    def job_source(cls, index: int) -> "FixOptions":
        return cls(f"data.sources[{index}].field", f"data.sources[{index}].format")

    def set(self, option: str, value: str) -> str:
        return f"use {option} {value}" if option.startswith("--") else f"set {option}: {value}"


def skip_counts(stats) -> dict[str, int]:
    """Nonzero skip counts, largest first."""
    counts = {k: getattr(stats, k) for k in stats.SKIP_KINDS if getattr(stats, k)}
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def describe_skips(stats, options: FixOptions = FixOptions()) -> str:
    """'skipped N: <count> <kind> (e.g. <where>), ...; <fix>; <fix>' or 'nothing was skipped'."""
    counts = skip_counts(stats)
    if not counts:
        return "nothing was skipped"
    parts = []
    for kind, n in counts.items():
        example = stats.first_examples.get(kind)
        parts.append(f"{n:,} {_KIND_WORDS[kind]}" + (f" (e.g. {example})" if example else ""))
    fixes = [fix for kind in counts if (fix := _fix(kind, stats, options))]
    return f"skipped {stats.skipped:,}: " + ", ".join(parts) + "".join(f"; {f}" for f in fixes)


def _fix(kind: str, stats, options: FixOptions) -> str | None:
    if kind == "missing_field":
        fields = sorted(stats.string_fields.items(), key=lambda kv: -kv[1])
        if not fields:
            return (f"the records have no other string field: check {options.field} "
                    f"(and {options.format}: text for plain text)")
        named = ", ".join(f"{name!r}" for name, _ in fields[:5])
        return f"the records have string field(s) {named}: {options.set(options.field, fields[0][0])}"
    if kind == "malformed_lines":
        return (f"jsonl needs one JSON object per line; for plain text files "
                f"{options.set(options.format, 'text')}")
    if kind == "invalid_utf8":
        return ("documents must be UTF-8 text: convert other encodings (iconv -t utf-8), leave out binary files, "
                "and fix the writer of records whose JSON escapes a lone surrogate (\\ud800-\\udfff)")
    if kind == "unreadable_files":
        return f"check the files are what {options.format} says (corrupt parquet, truncated gzip?)"
    return None
