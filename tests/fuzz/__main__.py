"""Run a fuzz target against the sanitizer build.

    python -m tests.fuzz TARGET [--seconds N] [--out DIR] [--rng-seed N]    coverage-guided, with atheris
    python -m tests.fuzz TARGET --replay                      every corpus input once, no atheris
    python -m tests.fuzz TARGET --seed                        add the target's hand-made seeds to its corpus
    python -m tests.fuzz --list

The process re-executes itself with the sanitizer runtimes preloaded (build.sanitizer_env)
and builds what is missing first. The corpus of TARGET is tests/corpus/TARGET/: atheris
reads it and writes the inputs it finds to --out (default: that same directory, so a long
run by hand grows the corpus; `make fuzz` does this). A crash, sanitizer report or
disagreement with the reference stops the run with its input saved under build/fuzz/crashes/
and exit status 1.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tests.fuzz import build

CORPUS = build.ROOT / "tests" / "corpus"
CRASHES = build.OUT / "crashes"
MAX_LEN = 8192


def corpus_dir(target: str) -> Path:
    return CORPUS / target


def replay(target: str) -> int:
    from tests.fuzz.targets import TARGETS
    fn = TARGETS[target]
    files = sorted(p for p in corpus_dir(target).glob("*") if p.is_file())
    for p in files:
        try:
            fn(p.read_bytes())
        except Exception:
            print(f"fuzz {target}: {p.relative_to(build.ROOT)} fails", file=sys.stderr)
            raise
    print(f"fuzz {target}: {len(files)} corpus inputs replayed, all agree", file=sys.stderr)
    return 0


def seed(target: str) -> int:
    import hashlib

    from tests.fuzz.targets import SEEDS
    d = corpus_dir(target)
    d.mkdir(parents=True, exist_ok=True)
    made = SEEDS[target]() if target in SEEDS else []
    for data in made:                          # named as libFuzzer names its inputs: no duplicates
        (d / f"seed-{hashlib.sha1(data, usedforsecurity=False).hexdigest()}").write_bytes(data)
    print(f"fuzz {target}: {len(made)} seeds in {d.relative_to(build.ROOT)}", file=sys.stderr)
    return 0


def fuzz(target: str, seconds: int, out: Path, rng_seed: int | None = None) -> int:
    import atheris

    from tests.fuzz.targets import MODULES, TARGETS, load
    load(MODULES[target], coverage=True)
    fn = TARGETS[target]
    out.mkdir(parents=True, exist_ok=True)
    CRASHES.mkdir(parents=True, exist_ok=True)
    seeds = corpus_dir(target)
    dirs = [str(out)] + ([str(seeds)] if seeds.resolve() != out.resolve() and seeds.is_dir() else [])
    argv = [sys.argv[0], f"-max_total_time={seconds}", f"-max_len={MAX_LEN}", "-timeout=20",
            "-rss_limit_mb=4096", f"-artifact_prefix={CRASHES}/{target}-", "-print_final_stats=1",
            *([f"-seed={rng_seed}"] if rng_seed is not None else []), *dirs]
    atheris.Setup(argv, fn)
    atheris.Fuzz()
    return 0                                   # not reached: libFuzzer exits


def main() -> int:
    from tests.fuzz.targets import TARGETS
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.split("\n\n")[0])
    ap.add_argument("target", nargs="?", choices=sorted(TARGETS))
    ap.add_argument("--seconds", type=int, default=60, help="how long to fuzz (default 60)")
    ap.add_argument("--out", type=Path, help="where new inputs go (default: the target's corpus)")
    ap.add_argument("--rng-seed", type=int, help="libFuzzer's random seed, so a run can be repeated (default: random)")
    ap.add_argument("--replay", action="store_true", help="run the corpus once instead of fuzzing")
    ap.add_argument("--seed", action="store_true", help="write the target's hand-made seeds into its corpus")
    ap.add_argument("--list", action="store_true", help="name the targets")
    args = ap.parse_args()
    if args.list or not args.target:
        print("\n".join(sorted(TARGETS)))
        return 0
    if args.seed:
        return seed(args.target)
    why = build.unavailable()
    if why:
        print(f"fuzz: {why}", file=sys.stderr)
        return 2
    if not build.sanitized():
        build.build(quiet=True)
        os.execve(sys.executable, [sys.executable, "-m", "tests.fuzz", *sys.argv[1:]], build.sanitizer_env())
    if args.replay:
        return replay(args.target)
    return fuzz(args.target, args.seconds, args.out or corpus_dir(args.target), args.rng_seed)


if __name__ == "__main__":
    sys.exit(main())
