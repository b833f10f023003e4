#!/usr/bin/env python3
"""Writes device profiles that combine register keys and rule keys, for merging into
the `profile` corpus.

The TOML variants of `toml_variants.py` change one key of a shipped profile at a time.
So they never reach the checks that look at two keys together, such as a data type with
a `count`, a `bit` with a bit table, or a vendor register number with a `function` that
contradicts it. This script draws each key of a register from a list of values (absent,
valid, at a limit, past it) and writes profiles of one to three metrics, so that most
pairs of values meet in some file. Rules get the same treatment. About a third of the
profiles instead hold two to five valid registers a few addresses apart, for the overlap
check.

Usage: profile_combinations.py OUT_DIR [COUNT] [SEED]

COUNT is the number of profiles (20,000 by default). SEED makes the output
reproducible (1 by default). OUT_DIR must be new or empty. Merge the output as
`docs/testing.md` describes.
"""

import random

import corpus_args

FUNCTIONS = ["coil", "discrete_input", "input_register", "holding_register"]
TYPES = ["bool", "u16", "i16", "u32", "i32", "u64", "i64", "f32", "f64", "string"]
REGISTERS = [
    1, 9999, 10000, 10001, 19999, 20001, 30001, 39999, 40001, 49999, 50000,
    100001, 165536, 165537, 300001, 365536, 400001, 465536, 465537, 0,
]
ADDRESSES = [0, 1, 100, 65532, 65534, 65535]

# Each entry is a TOML fragment, or None for "key absent".
LOCATION = (
    [None]
    + [f"address = {a}" for a in ADDRESSES]
    + [f'function = "{f}", address = {a}' for f in FUNCTIONS for a in ADDRESSES]
    + [f"register = {r}" for r in REGISTERS]
    + [f'function = "{f}", register = {r}' for f in FUNCTIONS for r in REGISTERS[:10]]
    + ["address = 1, register = 40001", 'function = "coil", address = 1, register = 1']
)
DATA_TYPE = [None] * 3 + [f'type = "{t}"' for t in TYPES]
BIT = [None] * 4 + ["bit = 0", "bit = 15", "bit = 16", "bit = 255"]
BITS = [None] * 4 + [
    "bits = [0, 3]", "bits = [3, 0]", "bits = [0, 15]", "bits = [0, 16]",
    "bits = [2]", "bits = []", "bits = [0, 1, 2]",
]
COUNT = [None] * 3 + [f"count = {c}" for c in (0, 1, 2, 3, 4, 5, 125, 126, 65535)]
ORDER = [None] * 2 + [f'order = "{o}"' for o in ("ABCD", "CDAB", "BADC", "DCBA")]
SCALE = [None] * 2 + [f"scale = {s}" for s in ("0", "0.1", "-1", "nan", "inf", "-inf", "1e308")]
OFFSET = [None] * 2 + [f"offset = {o}" for o in ("1.5", "-40", "nan", "inf")]
VALID = [None] * 2 + [
    "valid_min = 0, valid_max = 100", "valid_min = 100, valid_max = 0",
    "valid_min = 5", "valid_max = 5", "valid_min = nan, valid_max = 1",
    "valid_min = 1, valid_max = 1",
]
NO_VALUE = [None] * 2 + ["no_value = [65535]", "no_value = [-32768, 65535]", "no_value = []",
                        "no_value = [65535, 32767, -1, 0, 1e9, -32768]"]
CODES = [None] * 2 + [
    'codes = { "0" = "normal" }', 'codes = { " 3 " = "fault" }',
    'codes = { "x" = "bad" }', 'codes = { "0" = "normal", "-1" = "low", "zz" = "bad" }',
    'codes = { "99999999999999999999" = "too big" }', 'codes = { "3" = "a", " 3" = "b" }',
] + [
    # Keys that the integer parser reads or rejects at its edges.
    "codes = { " + ", ".join(f'"{k}" = "k"' for k in keys) + " }"
    for keys in (
        ["+3", "-0"], ["-"], [""], ["0x10"], ["1_000"], ["9223372036854775807"],
        ["-9223372036854775808"], ["9223372036854775808"], ["-9223372036854775809"],
        ["\\t5\\n"], ["٣"], ["00000000000000000000000000000001"],
    )
] + [
    # Enough codes to split the nodes of the map they are kept in, in ascending,
    # descending and shuffled order.
    "codes = { " + ", ".join(f'"{c}" = "c{c}"' for c in order) + " }"
    for n in (12, 13, 40, 150, 400)
    for order in (range(n), range(n, 0, -1), random.Random(n).sample(range(-500, 500), n))
]
KIND = [None] * 3 + ['kind = "number"', 'kind = "bool"']

RULE_KIND = ["above", "below", "equals"]
RULE_LEVELS = [
    None, "level1 = 20", "level2 = 50", "level1 = 20, level2 = 50",
    "level1 = 50, level2 = 20", "level1 = 20, level2 = 20", "level1 = nan",
    "level2 = inf",
]
RULE_STATE = [None, "equals = true", "level = 1", "level = 2", "level = 3",
              "equals = false, level = 2", "level = 0"]
RULE_EXTRA = [None, "deadband = 1", "deadband = -1", "deadband = nan",
              'min_duration = "10s"', 'min_duration = "0s"', 'description = "d"']


def pick(rng, values):
    return rng.choice(values)


def register(rng):
    # Some registers carry few keys, so that valid ones and single problems are common too.
    keep = rng.choice([0.2, 0.5, 1.0])
    parts = [pick(rng, LOCATION)] + [
        pick(rng, f) if rng.random() < keep else None
        for f in (DATA_TYPE, BIT, BITS, COUNT, ORDER, SCALE, OFFSET, VALID, NO_VALUE, CODES)
    ]
    parts = [p for p in parts if p]
    return "{ " + ", ".join(parts) + " }"


def metric(rng, name):
    lines = ["[[metrics]]", f'name = "{name}"']
    kind = pick(rng, KIND)
    if kind:
        lines.append(kind)
    if rng.random() < 0.9:
        lines.append(f"modbus = {register(rng)}")
    return "\n".join(lines)


def rule(rng, index, metrics):
    lines = ["[[rules]]", f'id = "r{index}"']
    lines.append(f'metric = "{rng.choice(metrics + ["missing"])}"')
    lines.append(f'kind = "{pick(rng, RULE_KIND)}"')
    for values in (RULE_LEVELS, RULE_STATE, RULE_EXTRA):
        part = pick(rng, values)
        if part:
            lines.extend(p.strip() for p in part.split(","))
    return "\n".join(lines)


def near_register(rng, function, base):
    """Returns the kind line and a valid register a few addresses from `base`, read as a
    flag, a field or a whole value."""
    address = base + rng.randint(0, 3)
    if function in ("coil", "discrete_input"):
        return 'kind = "bool"', f'{{ function = "{function}", address = {address} }}'
    shape = rng.randint(0, 3)
    if shape == 0:
        spec = f'type = "bool", bit = {rng.randint(0, 15)}'
        kind = 'kind = "bool"'
    elif shape == 1:
        first = rng.randint(0, 15)
        spec = f"bits = [{first}, {rng.randint(first, 15)}]"
        kind = ""
    else:
        spec = f'type = "{rng.choice(TYPES[1:-1])}"'
        kind = ""
        if rng.random() < 0.2:
            spec = f'type = "string", count = {rng.randint(1, 6)}'
    return kind, f'{{ function = "{function}", address = {address}, {spec} }}'


def near_profile(rng):
    """Writes a profile whose valid registers lie close together, for the overlap check."""
    function = rng.choice(FUNCTIONS)
    # 65526 leaves room for the longest register drawn here, a 6-register string.
    base = rng.choice([0, 100, 65526])
    blocks = ['name = "near"']
    for i in range(rng.randint(2, 5)):
        kind, spec = near_register(rng, function, base)
        lines = ["[[metrics]]", f'name = "m{i}"', kind, f"modbus = {spec}"]
        blocks.append("\n".join(line for line in lines if line))
    return "\n\n".join(blocks) + "\n"


def profile(rng):
    if rng.random() < 0.3:
        return near_profile(rng)
    names = [f"m{i}" for i in range(rng.randint(1, 3))]
    if rng.random() < 0.2:
        # Names that break snake_case, with characters of one to four UTF-8 bytes.
        names[0] = rng.choice(["M0", "0m", "m_0", "m-0", "", "é", "m0_", "_m", "mé", "m 0",
                               "中", "m中", "😀", "m😀", "é0"])
    if len(names) > 1 and rng.random() < 0.1:
        names[1] = names[0]
    blocks = ['name = "combo"']
    if rng.random() < 0.3:
        blocks.append(f"[modbus]\nmax_registers_per_read = {rng.choice([0, 1, 125, 126])}")
    blocks += [metric(rng, n) for n in names]
    blocks += [rule(rng, i, names) for i in range(rng.randint(0, 2))]
    return "\n\n".join(blocks) + "\n"


def main():
    parser = corpus_args.parser("Writes device profiles that combine register and rule keys.")
    args = parser.parse_args()
    corpus_args.create_out_dir(parser, args.out_dir)
    rng = random.Random(args.seed)
    corpus_args.write_numbered(args.out_dir, args.count, lambda: profile(rng))
    print(f"wrote {args.count} profiles to {args.out_dir}")


if __name__ == "__main__":
    main()
