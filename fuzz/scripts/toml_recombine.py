#!/usr/bin/env python3
"""Writes TOML files that recombine the keys and values of a corpus, for merging back
into it.

libFuzzer splices inputs byte by byte, so two keys that different corpus files set
rarely meet in one valid document. This script parses every corpus file that is valid
TOML and collects the values seen at each key path, where all `[[devices]]` entries
share one path. Each document it writes starts from a random corpus file, then replaces,
drops or adds keys with values seen elsewhere at the same path. The checks of `config` and `profile`
then see combinations such as a Modbus device with a serial port and a TCP host, or a
rule with the thresholds of another.

Usage: toml_recombine.py [--sweep] CORPUS_DIR OUT_DIR [COUNT] [SEED]

COUNT is the number of files (20,000 by default). SEED makes the output reproducible
(1 by default). OUT_DIR must be new or empty. Merge the output as `docs/testing.md`
describes.

With `--sweep`, the script writes instead, for each key path of the corpus and a value of
each TOML type, a document that holds only that key, such as
`[[devices]] modbus = { timeout = [] }`. serde reports a key's type error before it
misses the required keys, so a document whose value has the wrong type reaches the type
error of that one key.

The output is written by a small serializer: tables become `[table]` headers, arrays of
tables `[[table]]` headers, and deeper tables inline tables. Comments and the original
layout are lost, so the checks that point at a line see only this layout.
"""

import datetime
import json
import math
import os
import random
import tomllib

import corpus_args

ARRAY = "[]"
# Values of every TOML type, for the type errors of each key.
OTHER_TYPES = [
    "text", "", 0, -1, 65536, 2**63 - 1, 1.5, -0.0, float("nan"), True, [], [1, "a"],
    {}, {"x": 1}, datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc),
    datetime.date(2026, 1, 1), datetime.time(12, 0),
]


def load(corpus):
    docs = []
    for name in sorted(os.listdir(corpus)):
        path = os.path.join(corpus, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, "rb") as f:
                docs.append(tomllib.loads(f.read().decode("utf-8")))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError, ValueError):
            continue
    return docs


def collect(value, path, pools):
    """Adds every value inside `value` to `pools`, keyed by its path. Tables and the
    entries of arrays of tables are pooled whole and also walked."""
    if isinstance(value, dict):
        for key, child in value.items():
            child_path = path + (key,)
            pools.setdefault(child_path, []).append(child)
            collect(child, child_path, pools)
    elif is_table_array(value):
        for entry in value:
            pools.setdefault(path + (ARRAY,), []).append(entry)
            collect(entry, path + (ARRAY,), pools)


def mutate(value, path, pools, rng, rate):
    """Returns a copy of the table `value` with some keys replaced, dropped or added."""
    if is_table_array(value):
        entry_path = path + (ARRAY,)
        entries = [mutate(e, entry_path, pools, rng, rate) for e in value]
        if rng.random() < rate:
            # An entry of another corpus file, such as a second device.
            extra = rng.choice(pools.get(entry_path, value))
            entries.append(mutate(extra, entry_path, pools, rng, rate))
        return entries
    if not isinstance(value, dict):
        return value
    out = {}
    for key, child in value.items():
        child_path = path + (key,)
        roll = rng.random()
        if roll < rate / 4:
            continue
        if roll < rate / 2:
            child = rng.choice(OTHER_TYPES)
        elif roll < rate and child_path in pools:
            child = rng.choice(pools[child_path])
        out[key] = mutate(child, child_path, pools, rng, rate)
    # Keys seen at this path elsewhere in the corpus.
    siblings = [p[-1] for p in pools if len(p) == len(path) + 1 and p[:-1] == path]
    for key in rng.sample(siblings, min(len(siblings), 2)):
        if key not in out and rng.random() < rate:
            out[key] = rng.choice(pools[path + (key,)])
    return out


def key_text(key):
    bare = key and all(c.isalnum() and c.isascii() or c in "-_" for c in key)
    return key if bare else string_text(key)


def string_text(text):
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def value_text(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return string_text(value)
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(value_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{key_text(k)} = {value_text(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__}")


def is_table_array(value):
    return isinstance(value, list) and value and all(isinstance(v, dict) for v in value)


def document_text(doc):
    lines = []
    for key, value in doc.items():
        if not isinstance(value, dict) and not is_table_array(value):
            lines.append(f"{key_text(key)} = {value_text(value)}")
    for key, value in doc.items():
        if isinstance(value, dict):
            lines.append(f"\n[{key_text(key)}]")
            lines += [f"{key_text(k)} = {value_text(v)}" for k, v in value.items()]
        elif is_table_array(value):
            for entry in value:
                lines.append(f"\n[[{key_text(key)}]]")
                lines += [f"{key_text(k)} = {value_text(v)}" for k, v in entry.items()]
    return "\n".join(lines) + "\n"


def minimal(path, value):
    """Wraps `value` in the tables and arrays that `path` names, giving a document."""
    for key in reversed(path):
        value = [value] if key == ARRAY else {key: value}
    return value


def sweep(pools, out):
    written = 0
    for path in sorted(pools, key=repr):
        if not path or path[-1] == ARRAY:
            continue
        for index, value in enumerate(OTHER_TYPES):
            doc = minimal(path, value)
            if not isinstance(doc, dict):
                continue
            name = f"sweep-{written:06}.toml"
            with open(os.path.join(out, name), "w", encoding="utf-8") as f:
                f.write(document_text(doc))
            written += 1
    return written


def main():
    parser = corpus_args.parser("Writes TOML files that recombine the keys of a corpus.", corpus=True)
    parser.add_argument("--sweep", action="store_true",
                        help="write one document per key path and TOML type instead; "
                        "COUNT and SEED do not apply")
    args = parser.parse_args()

    docs = load(args.corpus)
    if not docs:
        parser.error(f"no file in {args.corpus} is valid TOML; give a folder of TOML files")
    pools = {}
    for doc in docs:
        collect(doc, (), pools)
    corpus_args.create_out_dir(parser, args.out_dir)
    if args.sweep:
        print(f"wrote {sweep(pools, args.out_dir)} files to {args.out_dir}")
        return

    rng = random.Random(args.seed)
    written = 0
    for i in range(args.count):
        doc = mutate(rng.choice(docs), (), pools, rng, rng.choice([0.1, 0.3, 0.6]))
        try:
            text = document_text(doc)
        except TypeError:
            continue
        path = os.path.join(args.out_dir, f"recombined-{i:06}.toml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        written += 1
    print(f"read {len(docs)} TOML files, {len(pools)} key paths; wrote {written} files to {args.out_dir}")


if __name__ == "__main__":
    main()
