#!/usr/bin/env python3
"""Counts the edges of Stonelion's own code that a fuzz corpus covers, and compares two
counts.

libFuzzer's `cov` counts edges in every crate, so a target can keep growing in `toml` or
`serde` while nothing new runs in Stonelion's checks. This script replays corpus folders
with `-runs=0 -print_coverage=1` in a fuzz target built with AddressSanitizer
(`cargo fuzz build`). libFuzzer prints that report by function only when the sanitizer
runtime can symbolize code addresses, so a build with `-s none` prints nothing. For each
covered function the script stores its covered and total edges and the lines of `src/`
among its uncovered edges.

Usage:
  own_edges.py count [--src ROOT] BINARY OUT.json CORPUS_DIR...
  own_edges.py compare BEFORE.json AFTER.json

`count` prints two figures:
- `own`: the covered edges of functions whose source file is in `src/`. Code that the
  compiler inlines into them (hash table probing, allocation, serde's visitors) counts
  too. Hash maps take a random seed in each process, so two replays of one corpus can
  differ by a few edges.
- `uncovered on src/ lines`: the uncovered edges, in any covered function, located on a
  line of `src/`. Inlined library code is left out, so the figure depends on the inputs
  only, as far as Stonelion's own branches do not depend on the hash seed. It also rises
  when a newly covered function brings uncovered lines, so compare counts rather than
  reading it alone.

`compare` lists, for the functions that both counts cover, each line of `src/` with
edges that AFTER covers and BEFORE does not (`+n`), or the reverse (`-n`). Their net sum
is `edges gained on src/ lines`. libFuzzer prints no location for covered edges, so the
functions that only AFTER covers are listed by name with their covered edges, and
counted apart: `own` ones, and others whose uncovered edges include lines of `src/`.
A function of another crate that inlines covered Stonelion code and has no uncovered
edge on `src/` lines is not detected. To check a plateau, BEFORE replays the corpus with
the inputs found before two thirds of a run's executions, and AFTER with all of them.
A plateau has no gained edge and no newly covered function of either kind.

ROOT is the repository root that the binary was built from, the folder that contains
`src/`, as recorded in the binary's debug information. It defaults to the repository that
contains this script.
"""

import argparse
import collections
import hashlib
import json
import os
import re
import subprocess
import sys

REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COVERED_FUNC = re.compile(r"COVERED_FUNC: hits: \d+ edges: (\d+)/(\d+) (.+):(\d+)$")
UNCOVERED_PC = re.compile(r"\s*UNCOVERED_PC: (.+)$")


def split_name_and_path(text, src):
    """Splits `NAME PATH` of a COVERED_FUNC line. Function names contain spaces, so a
    path under `src` is found by its prefix, and any other path is the last word."""
    marker = text.rfind(" " + src)
    if marker >= 0:
        return text[:marker], text[marker + 1:]
    name, _, path = text.rpartition(" ")
    return name, path


def parse_coverage(report, src):
    """Parses the `-print_coverage=1` report into a dict keyed by function name, path and
    line. Generic code can print one name more than once, so repeats get a suffix."""
    functions = {}
    current = None
    for line in report.splitlines():
        match = COVERED_FUNC.match(line)
        if match:
            covered, total, name_and_path, line_number = match.groups()
            name, path = split_name_and_path(name_and_path, src)
            current = {
                "covered": int(covered),
                "total": int(total),
                "own": path.startswith(src),
                "uncovered_src": [],
            }
            key = f"{name} at {path}:{line_number}"
            repeat = 1
            while key in functions:
                repeat += 1
                key = f"{name} at {path}:{line_number} (#{repeat})"
            functions[key] = current
            continue
        match = UNCOVERED_PC.match(line)
        if match and current is not None:
            location = match.group(1)
            if location.startswith(src):
                current["uncovered_src"].append(location[len(src):])
    return functions


def summarize(functions):
    """Returns the `own` count and the count of uncovered edges on lines of `src/`."""
    own = sum(f["covered"] for f in functions.values() if f["own"])
    uncovered = sum(len(f["uncovered_src"]) for f in functions.values())
    return own, uncovered


def file_digest(path):
    """Returns the SHA-256 of a file, so that `compare` can tell two builds apart."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_count_arguments(args):
    """Exits with a message when an argument of `count` cannot work, before the replay."""
    for folder in args.corpus:
        if not os.path.isdir(folder):
            sys.exit(f"{folder} is not a folder; give corpus folders, such as corpus/config")
        if not os.listdir(folder):
            sys.exit(f"{folder} is empty; a replay of it covers only libFuzzer's empty input")
    out_folder = os.path.dirname(os.path.abspath(args.out))
    if os.path.isdir(args.out) or not os.path.isdir(out_folder):
        sys.exit(f"{args.out} is not a file path in an existing folder; give OUT.json "
                 f"before the corpus folders")
    if not os.path.isdir(os.path.join(args.src, "src")):
        sys.exit(f"{args.src} has no src/ folder; give the repository root with --src")


def count(args):
    """Replays the corpus folders, writes the per-function counts and prints the totals."""
    check_count_arguments(args)
    src = os.path.join(os.path.abspath(args.src), "src") + os.sep
    command = [args.binary, "-runs=0", "-print_coverage=1", "-rss_limit_mb=4096", "-timeout=60"]
    try:
        result = subprocess.run(command + args.corpus, capture_output=True)
        digest = file_digest(args.binary)
    except OSError as error:
        sys.exit(f"cannot run {args.binary}: {error.strerror}")

    report = result.stderr.decode("utf-8", errors="replace")
    if result.returncode != 0:
        # libFuzzer prints the coverage report after a crash, timeout or out-of-memory
        # report, so the cause is the text before it.
        cause = report.split("\nCOVERAGE:", 1)[0]
        sys.exit(f"{args.binary} exited with status {result.returncode} during the replay, "
                 f"because an input crashed, timed out or ran out of memory. Its last output:\n"
                 f"{cause[-3000:]}")

    functions = parse_coverage(report, src)
    if not functions:
        sys.exit(f"{args.binary} printed no covered function. Build the target with "
                 f"AddressSanitizer (`cargo fuzz build`, not `-s none`). Its last output:\n"
                 f"{report[-2000:]}")
    if not any(f["own"] for f in functions.values()):
        sys.exit(f"no covered function is in {src}. Give the repository root that the "
                 f"binary was built from with --src. One function is at "
                 f"{next(iter(functions))}")

    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"binary_sha256": digest, "functions": functions}, f, indent=0,
                  sort_keys=True)
    own, uncovered = summarize(functions)
    own_functions = sum(f["own"] for f in functions.values())
    print(f"own {own} in {own_functions} functions; uncovered on src/ lines {uncovered} "
          f"in {len(functions)} covered functions")


def load_count(path):
    """Reads a file that `count` wrote, or exits with a message that names it."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        functions = data["functions"]
        for function in functions.values():
            if not {"covered", "total", "own", "uncovered_src"} <= function.keys():
                raise KeyError("a function entry is missing a field")
        return data["binary_sha256"], functions
    except (OSError, ValueError) as error:
        sys.exit(f"cannot read {path}: {error}")
    except (KeyError, TypeError, AttributeError):
        sys.exit(f"{path} is not a file that `own_edges.py count` wrote; count again")


def print_line_changes(key, before_uncovered, after_uncovered):
    """Prints the `src/` lines of one function whose edges AFTER covers and BEFORE does
    not (`+n`), or the reverse (`-n`), and returns the net count."""
    was = collections.Counter(before_uncovered)
    now = collections.Counter(after_uncovered)
    gained = 0
    for location, n in sorted((was - now).items()):
        print(f"+{n} {location} in {key}")
        gained += n
    for location, n in sorted((now - was).items()):
        print(f"-{n} {location} in {key}")
        gained -= n
    return gained


def compare(args):
    """Prints the edges on lines of `src/` and the functions that AFTER adds to BEFORE."""
    before_binary, before = load_count(args.before)
    after_binary, after = load_count(args.after)
    if before_binary != after_binary:
        sys.exit(f"{args.before} and {args.after} come from different builds, whose line "
                 f"numbers differ. Count both with one binary.")

    gained = 0
    new_own = []
    new_other = []
    for key, function in sorted(after.items()):
        if key in before:
            gained += print_line_changes(key, before[key]["uncovered_src"],
                                         function["uncovered_src"])
            continue
        if function["own"]:
            new_own.append(function["covered"])
        elif function["uncovered_src"]:
            new_other.append(function["covered"])
        else:
            continue
        print(f"newly covered function: {key}, {function['covered']}/{function['total']} "
              f"edges, {'own' if function['own'] else 'not own, with src/ lines'}")

    for key in sorted(before.keys() - after.keys()):
        if before[key]["own"] or before[key]["uncovered_src"]:
            print(f"no longer covered function: {key}")

    own_before, _ = summarize(before)
    own_after, _ = summarize(after)
    print(f"own {own_before} -> {own_after}; edges gained on src/ lines {gained}; "
          f"newly covered functions: {len(new_own)} own with {sum(new_own)} edges, "
          f"{len(new_other)} others with src/ lines and {sum(new_other)} edges")


def main():
    parser = argparse.ArgumentParser(
        description="Counts the edges of Stonelion's code that a fuzz corpus covers.")
    commands = parser.add_subparsers(dest="command", required=True)
    count_parser = commands.add_parser("count", help="replay corpus folders and count")
    count_parser.add_argument("binary", metavar="BINARY",
                              help="fuzz target built with AddressSanitizer")
    count_parser.add_argument("out", metavar="OUT.json", help="file for the per-function counts")
    count_parser.add_argument("corpus", metavar="CORPUS_DIR", nargs="+",
                              help="corpus folders to replay")
    count_parser.add_argument("--src", metavar="ROOT", default=REPOSITORY,
                              help="repository root that the binary was built from, the "
                                   "folder that contains src/ (default: the repository of "
                                   "this script)")
    compare_parser = commands.add_parser("compare", help="list the edges AFTER adds to BEFORE")
    compare_parser.add_argument("before", metavar="BEFORE.json",
                                help="count of the corpus at two thirds of a run")
    compare_parser.add_argument("after", metavar="AFTER.json",
                                help="count of the corpus at the end of the run")
    args = parser.parse_args()
    if args.command == "count":
        count(args)
    else:
        compare(args)


if __name__ == "__main__":
    main()
