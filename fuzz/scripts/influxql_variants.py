#!/usr/bin/env python3
"""Write variants of InfluxQL fuzz inputs, for merging into the `influxql` corpus.

Each printable input shorter than 400 characters is split into tokens. Every variant
removes one token or replaces it with another of its class. The classes are keywords,
function names, numbers and durations, names, strings and regexes, and operators. The
variants are shuffled with a fixed seed and cut to LIMIT, because the target runs about
a thousand queries a second.

Usage: influxql_variants.py CORPUS_DIR DICT OUT_DIR LIMIT
Then keep only the variants that add coverage:
  influxql -merge=1 -set_cover_merge=1 -use_counters=0 corpus/influxql OUT_DIR
"""

import hashlib
import random
import re
import sys
from pathlib import Path

EXTRA_KEYWORDS = {
    "SELECT", "FROM", "WHERE", "GROUP", "BY", "ORDER", "LIMIT", "OFFSET", "SLIMIT",
    "SOFFSET", "FILL", "TZ", "AND", "OR", "AS", "ASC", "DESC", "ON", "IN", "WITH", "KEY",
    "SHOW", "DATABASES", "MEASUREMENTS", "SERIES", "TAG", "FIELD", "KEYS", "VALUES",
    "RETENTION", "POLICIES", "INTO", "DROP", "CREATE", "DELETE", "LIKE", "NOT", "null",
    "none", "previous", "linear", "true", "false",
}
FUNCTIONS = [
    "count", "sum", "mean", "median", "mode", "min", "max", "first", "last", "spread",
    "stddev", "percentile", "distinct", "integral", "derivative",
    "non_negative_derivative", "difference", "non_negative_difference", "moving_average",
    "cumulative_sum", "elapsed", "top", "bottom", "sample", "abs", "round", "floor",
    "ceil", "now", "time", "fill", "regex",
]
NAMES = [
    "time", "gas_lel", "value", '"gas-detector"', "site", "device", "host", "*", '"x"',
    "autogen", "stonelion", '"stonelion"."autogen"."gas-detector"',
]
NUMBERS = [
    "0", "1", "-1", "2", "100", "1000000000", "1767225600000", "9223372036854775807",
    "9223372036854775808", "-9223372036854775808", "1.5", "1e308", "0.0", "1e-9",
]
DURATIONS = [
    "1ns", "1u", "1µs", "1ms", "1s", "1m", "1h", "1d", "1w", "0s", "100000w",
    "9223372036854775807ns",
]
OPERATORS = [
    "=", "!=", "<>", "<", "<=", ">", ">=", "=~", "!~", "+", "-", "*", "/", "%", "&", "|",
    "^", "(", ")", ",", ";", ".", "::",
]
LITERALS = ["''", "'x'", "'2026-01-01T00:00:00Z'", "'1970-01-01'", "/.*/", "/^$/", "/(/", "/[/"]

TOKEN = re.compile(
    r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|/(?:[^/\\]|\\.)*/"
    r"|\d+(?:\.\d+)?(?:ns|u|µs|ms|s|m|h|d|w)\b|\d+(?:\.\d+)?(?:e-?\d+)?"
    r"|\w+|::|!=|<>|<=|>=|=~|!~|\S"
)


def replacements(token, next_char, keywords):
    """Returns the tokens of the same class as `token`."""
    if re.fullmatch(r"\d+(\.\d+)?(ns|u|µs|ms|s|m|h|d|w)", token):
        return DURATIONS + NUMBERS
    if re.fullmatch(r"[\d.e-]+", token):
        return NUMBERS + DURATIONS
    if re.fullmatch(r"\w+", token) and next_char == "(":
        return FUNCTIONS
    if re.fullmatch(r"[A-Za-z]+", token) and token.upper() == token:
        return keywords
    if re.fullmatch(r'\w+|".*"', token):
        return NAMES + FUNCTIONS[:5]
    if token.startswith("'") or (token.startswith("/") and len(token) > 1):
        return LITERALS
    return OPERATORS


def main():
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    corpus, dictionary, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    if not sys.argv[4].isdigit():
        sys.exit(f"LIMIT {sys.argv[4]!r} is invalid; write a number of variants such as 150000")
    limit = int(sys.argv[4])
    if not corpus.is_dir():
        sys.exit(f"corpus folder {corpus} not found; name a folder of fuzz inputs")
    if not dictionary.is_file():
        sys.exit(f"dictionary {dictionary} not found; name a libFuzzer dictionary file")
    entries = [
        line.strip().strip('"').strip()
        for line in dictionary.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    keywords = sorted({e for e in entries if re.fullmatch(r"[A-Z ]+", e)} | EXTRA_KEYWORDS)

    queries = []
    for path in sorted(corpus.iterdir()):
        try:
            text = path.read_bytes().decode()
        except UnicodeDecodeError:
            continue
        if len(text) >= 400 or not all(32 <= ord(c) < 127 for c in text):
            continue
        for token in TOKEN.finditer(text):
            start, end = token.span()
            for value in replacements(token.group(), text[end : end + 1], keywords) + [""]:
                if value != token.group():
                    queries.append(text[:start] + value + text[end:])

    random.seed(7)
    random.shuffle(queries)
    out.mkdir(parents=True, exist_ok=True)
    written = set()
    for query in queries:
        if len(written) >= limit:
            break
        name = hashlib.sha1(query.encode()).hexdigest()
        if name not in written:
            written.add(name)
            (out / name).write_text(query)
    print(f"{len(written)} of {len(queries)} variants written to {out}")


if __name__ == "__main__":
    main()
