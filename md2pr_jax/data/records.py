"""Reading raw dataset files under a bad-record policy.

Every reader here goes line by line, decodes UTF-8 itself and reports each bad record to a
`BadRecords` object, which either raises (policy 'error': the message names file and line)
or counts the record by kind and skips it (policy 'skip'). Nothing is dropped silently: the
counts and the first examples of each kind are logged and written beside the prepared data.
Files open through etils.epath: a path may be local or in a bucket (gs://).
"""

from __future__ import annotations

import codecs
import collections
import io
import json
from typing import Iterable, Iterator, Sequence

from absl import logging
from etils import epath

# Every kind of bad record the readers know. A new kind is added here, nowhere else.
KINDS = (
    "bad_utf8",  # bytes that are not UTF-8
    "malformed_json",  # a JSON line (or array element) that does not parse, or is not an object
    "malformed_row",  # a TSV/CSV row with the wrong number of columns or an unparsable value
    "missing_field",  # a required field is absent (or a DPR example has no positive passage)
    "empty_text",  # a document or query whose text is empty after stripping
    "duplicate_id",  # a document or query id seen before
    "unknown_query",  # a judgement naming a query the queries file does not hold
    "unknown_doc",  # a judgement (or negative) naming a document the corpus does not hold
)
POLICIES = ("error", "skip")
_MAX_EXAMPLES = 20  # examples of each kind kept for the report


class BadRecordError(ValueError):
    """A bad input record under the 'error' policy; the message names file, line and kind."""


class BadRecords:
    """Applies the bad-record policy and keeps the per-kind counts of skipped records."""

    def __init__(self, policy: str):
        if policy not in POLICIES:
            raise ValueError(f"bad-record policy {policy!r}; expected one of {POLICIES} (config.data.bad_records)")
        self.policy = policy
        self.counts: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, list[str]] = collections.defaultdict(list)

    def report(self, kind: str, path: str, line: int, detail: str) -> None:
        """Raises BadRecordError (policy 'error') or counts the record as skipped ('skip')."""
        assert kind in KINDS, kind
        where = f"{path}:{line}" if line else path
        message = f"{where}: {kind.replace('_', ' ')}: {detail}"
        if self.policy == "error":
            raise BadRecordError(
                f"{message}\nFix the file, or set config.data.bad_records='skip' to count and skip such records."
            )
        self.counts[kind] += 1
        if len(self.examples[kind]) < _MAX_EXAMPLES:
            self.examples[kind].append(message)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_json(self) -> dict:
        return {
            "policy": self.policy,
            "total": self.total,
            "counts": {k: self.counts.get(k, 0) for k in KINDS},
            "examples": {k: v for k, v in self.examples.items() if v},
        }

    def log(self, what: str) -> None:
        if self.total:
            counts = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))
            logging.warning("%s: skipped %d bad record(s): %s", what, self.total, counts)

    def write(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=1)


def open_binary(path: str) -> io.BufferedIOBase:
    """`path` (local or gs://) opened for buffered binary reads. A bucket's file comes from
    fsspec, whose own readline reads a whole block per line; a BufferedReader splits lines
    from its buffer instead."""
    f = epath.Path(path).open("rb")
    return f if isinstance(f, io.BufferedIOBase) else io.BufferedReader(f, buffer_size=1 << 22)


def read_lines(path: str, bad: BadRecords) -> Iterator[tuple[int, str]]:
    """Yields (line number from 1, text without the line break); skips blank lines."""
    with open_binary(path) as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad.report("bad_utf8", path, lineno, f"{e.reason} at byte {e.start}")
                continue
            line = line.rstrip("\r\n")
            if line.strip():
                yield lineno, line


def read_jsonl(path: str, bad: BadRecords, required: Sequence[str]) -> Iterator[tuple[int, dict]]:
    """Yields (line, object) for each JSON line holding every `required` field."""
    for lineno, line in read_lines(path, bad):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            bad.report("malformed_json", path, lineno, e.msg)
            continue
        if not isinstance(obj, dict):
            bad.report("malformed_json", path, lineno, f"expected a JSON object, got {type(obj).__name__}")
            continue
        if check_fields(obj, required, bad, path, lineno):
            yield lineno, obj


def check_fields(obj: dict, required: Iterable[str], bad: BadRecords, path: str, line: int) -> bool:
    """True if `obj` holds every required field; else reports 'missing_field'."""
    missing = [k for k in required if obj.get(k) is None]
    if missing:
        bad.report("missing_field", path, line, f"no field {', '.join(map(repr, missing))}")
        return False
    return True


def read_tsv(
    path: str, bad: BadRecords, num_columns: int | Sequence[int], header_prefix: str | None = None
) -> Iterator[tuple[int, list[str]]]:
    """Yields (line, columns) of a tab-separated file; a first line starting with
    `header_prefix` is a header and is passed over."""
    allowed = (num_columns,) if isinstance(num_columns, int) else tuple(num_columns)
    for lineno, line in read_lines(path, bad):
        if lineno == 1 and header_prefix is not None and line.startswith(header_prefix):
            continue
        cols = line.split("\t")
        if len(cols) not in allowed:
            bad.report(
                "malformed_row", path, lineno, f"{len(cols)} tab-separated column(s), expected {' or '.join(map(str, allowed))}"
            )
            continue
        yield lineno, cols


def parse_int(text: str, bad: BadRecords, path: str, line: int, what: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        bad.report("malformed_row", path, line, f"{what} {text!r} is not an integer")
        return None


def iter_json_array(path: str, bad: BadRecords, chunk_bytes: int = 1 << 22) -> Iterator[tuple[int, object]]:
    """Streams the elements of a (possibly multi-GB) JSON array file such as DPR's
    biencoder-nq-*.json, yielding (line where the element starts, element).

    An element holding bytes that are not UTF-8 is reported as 'bad_utf8'. A syntax error
    is reported as 'malformed_json' and ends the file: past it, element boundaries are unknown.
    """
    decoder = json.JSONDecoder()
    # surrogateescape keeps bad bytes as lone surrogates, so they can be found per element.
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
    with open_binary(path) as f:
        buf, pos, line, eof = "", 0, 1, False

        def more() -> bool:
            nonlocal buf, pos, eof
            if eof:
                return False
            chunk = f.read(chunk_bytes)
            eof = not chunk
            buf = buf[pos:] + utf8.decode(chunk, final=eof)
            pos = 0
            return True

        def skip_ws() -> None:
            nonlocal pos, line
            while True:
                start = pos
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                line += buf.count("\n", start, pos)
                if pos < len(buf) or not more():
                    return

        skip_ws()
        if buf[pos : pos + 1] != "[":
            bad.report("malformed_json", path, line, "expected a JSON array of examples")
            return
        pos += 1
        while True:
            skip_ws()
            if buf[pos : pos + 1] == "]":
                return
            while True:
                try:
                    obj, end = decoder.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError as e:
                    if not more():
                        bad.report("malformed_json", path, line + buf.count("\n", pos, e.pos), e.msg)
                        return
            span = buf[pos:end]
            first_line = line
            line += span.count("\n")
            pos = end
            if _has_surrogate(span):
                bad.report("bad_utf8", path, first_line, "element holds bytes that are not UTF-8")
            else:
                yield first_line, obj
            skip_ws()
            if buf[pos : pos + 1] == ",":
                pos += 1
            elif buf[pos : pos + 1] != "]":
                bad.report("malformed_json", path, line, "expected ',' or ']' between array elements")
                return


def _has_surrogate(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text) if not text.isascii() else False
