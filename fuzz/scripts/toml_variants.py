#!/usr/bin/env python3
"""Write variants of TOML fuzz inputs, for merging into the `config` and `profile` corpora.

For each `key = value` line of each UTF-8 input, one variant drops the line and one
variant per replacement value puts that value in place of the old one. The replacements
are values of every TOML type, integers at the edges of Modbus ranges, NaN and the
infinities, and the enum strings of profiles and configs. So each key gets every type
and every known value at least once, which libFuzzer reaches by chance only, one byte at
a time. Commented-out keys and tables, such as the optional sections of the example
config, are uncommented one line at a time, and also as blocks of adjacent lines.

Usage: toml_variants.py CORPUS_DIR OUT_DIR
Then keep only the variants that add coverage:
  TARGET -merge=1 -set_cover_merge=1 -use_counters=0 corpus/TARGET OUT_DIR
"""

import hashlib
import re
import sys
from pathlib import Path

REPLACEMENTS = [
    # TOML types and the edges of integer and float ranges.
    '"x"', '""', "0", "-1", "1", "2", "3", "125", "126", "65535", "65536", "-0.0", "1.5",
    "1e308", "nan", "inf", "-inf", "true", "false", "[]", '["a"]', "[1, 2]", "{}",
    "{ a = 1 }", "1979-05-27T07:32:00Z", "1979-05-27",
    # Byte orders, rule kinds and durations.
    '"ABCD"', '"CDAB"', '"BADC"', '"DCBA"', '"above"', '"below"', '"equals"', '"10s"',
    '"0s"', '"1h"',
    # Data types, metric kinds, register tables and register references.
    '"u16"', '"i16"', '"u32"', '"i32"', '"f32"', '"u64"', '"i64"', '"f64"', '"bool"',
    '"string"', '"number"', '"coil"', '"discrete_input"', '"input_register"',
    '"holding_register"', '"40001"', '"30001"', '"10001"', '"00001"', '"40001.3"',
]

KEY_LINE = re.compile(r'^(\s*[A-Za-z0-9_."-]+\s*=\s*)(.*)$')
# A table header may end in a comment or, in a CRLF file, a carriage return.
# NOTE: prose such as "# 0 = off" matches too, and a commented multi-line array is
# uncommented on its first line only. Both give invalid TOML, which reaches parse errors only.
COMMENTED_LINE = re.compile(r'^\s*#\s?(\s*(\[.*|[A-Za-z0-9_."-]+\s*=.*))$')


def variants(text):
    """Yields each text with one `key = value` line dropped or its value replaced, or with
    commented-out TOML lines uncommented."""
    lines = text.split("\n")
    block = []
    for index, line in enumerate(lines + [""]):
        match = COMMENTED_LINE.match(line)
        if match:
            block.append(index)
            yield "\n".join(lines[:index] + [match.group(1)] + lines[index + 1 :])
            continue
        # Uncomment the whole block, and also its part from each table header on, because
        # keys before a header may repeat keys of the table above the block.
        starts = [block[0]] if len(block) > 1 else []
        starts += [i for i in block[1:] if lines[i].lstrip(" \t#").startswith("[")]
        for start in starts:
            uncommented = [COMMENTED_LINE.match(lines[i]).group(1) for i in block if i >= start]
            yield "\n".join(lines[:start] + uncommented + lines[index:])
        block = []
    for index, line in enumerate(lines):
        match = KEY_LINE.match(line)
        if not match:
            continue
        before, after = lines[:index], lines[index + 1 :]
        yield "\n".join(before + after)
        ending = "\r" if line.endswith("\r") else ""
        for value in REPLACEMENTS:
            yield "\n".join(before + [match.group(1) + value + ending] + after)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    corpus, out = Path(sys.argv[1]), Path(sys.argv[2])
    if not corpus.is_dir():
        sys.exit(f"corpus folder {corpus} not found or not a folder; name a folder of fuzz inputs")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        sys.exit(f"cannot create the output folder {out}: {error.strerror}; name a new folder")
    written = set()
    skipped = 0
    for path in sorted(corpus.iterdir()):
        if not path.is_file():
            continue
        try:
            text = path.read_bytes().decode()
        except UnicodeDecodeError:
            skipped += 1
            continue
        for variant in variants(text):
            data = variant.encode()
            name = hashlib.sha1(data).hexdigest()
            if name not in written:
                written.add(name)
                (out / name).write_bytes(data)
    print(f"{len(written)} variants written to {out}; {skipped} inputs not UTF-8, skipped")


if __name__ == "__main__":
    main()
