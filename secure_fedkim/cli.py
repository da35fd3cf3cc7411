"""`secure-fedkim`: the command line. The one place that wires secure_fedkim, privacy and attacks together."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _cmd_run(args) -> int:
    from secure_fedkim.config import load_config
    from secure_fedkim.run import format_comparison, run_federation

    cfg, text = load_config(args.config)
    result = run_federation(cfg, text, out_dir=args.out, progress=not args.quiet)
    if result.single_hospital:
        print(format_comparison(result))
    print(f"run written to {result.run_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="secure-fedkim", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a federation (Flower simulation on this machine)")
    r.add_argument("config", type=Path, help="YAML run config, e.g. configs/demo.yaml")
    r.add_argument("--out", type=Path, default=None, help="run directory (default: <out_dir>/<name>-<UTC time>)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.set_defaults(func=_cmd_run)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    from secure_fedkim.config import ConfigError
    from secure_fedkim.data import DataError

    try:
        return args.func(args)
    except (ConfigError, DataError, FileExistsError) as e:
        print(f"secure-fedkim: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
