"""Command-line arguments shared by the corpus scripts of this folder."""

import argparse
import os


def positive_int(text):
    """Parses a COUNT argument, a whole number of 1 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; write one such as 20000")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is too small; write 1 or more")
    return value


def seed(text):
    """Parses a SEED argument, any whole number."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; write one such as 1")


def corpus_dir(text):
    """Checks a CORPUS_DIR argument, an existing folder."""
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(
            f"{text} is not a folder; give a corpus folder, such as corpus/config")
    return text


def new_out_dir(text):
    """Checks an OUT_DIR argument, which must be new or empty, so that no earlier output
    is merged with this one."""
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a file; give a new folder")
    if os.path.isdir(text) and os.listdir(text):
        raise argparse.ArgumentTypeError(
            f"{text} is not empty; give a new folder, or empty this one first")
    return text


def create_out_dir(parser, path):
    """Creates the checked OUT_DIR, or exits with the parser's usage and the reason."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        parser.error(f"cannot create {path}: {error.strerror}")


def parser(description, corpus=False):
    """Returns a parser with the OUT_DIR, COUNT and SEED arguments of every script, after a
    CORPUS_DIR argument if `corpus` is set."""
    result = argparse.ArgumentParser(description=description)
    if corpus:
        result.add_argument("corpus", metavar="CORPUS_DIR", type=corpus_dir,
                            help="corpus folder whose TOML files are read")
    result.add_argument("out_dir", metavar="OUT_DIR", type=new_out_dir,
                        help="new or empty folder for the output")
    result.add_argument("count", metavar="COUNT", type=positive_int, nargs="?", default=20_000,
                        help="number of files to write (default 20000)")
    result.add_argument("seed", metavar="SEED", type=seed, nargs="?", default=1,
                        help="seed of the random choices; one seed gives one output (default 1)")
    return result


def write_numbered(out_dir, count, make_text):
    """Writes `count` files named combo-000000.toml and up, each from `make_text()`."""
    for i in range(count):
        with open(os.path.join(out_dir, f"combo-{i:06}.toml"), "w", encoding="utf-8") as f:
            f.write(make_text())
