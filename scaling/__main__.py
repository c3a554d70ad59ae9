"""``python -m scaling {grid,confirm,predict} ...``: the study's command line (see ``scaling``)."""
from __future__ import annotations

import argparse
import sys
from typing import Optional

import scaling
from scaling import confirm, grid, predict

# name -> (module with add_arguments/run and, where flags must fit together, check; one-line help)
COMMANDS = {
    "grid": (grid, "train the same samples at several batch sizes and optimizers, with an lr search"),
    "confirm": (confirm, "rerun a finished grid's best lrs with fresh seeds; steps to training-loss targets"),
    "predict": (predict, "predict steps at other batch sizes from one run's gradient noise scale"),
}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scaling", description=scaling.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parsers = {}
    for name, (module, summary) in COMMANDS.items():
        parsers[name] = commands.add_parser(name, help=summary, description=module.__doc__,
                                            formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(parsers[name])
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    module = COMMANDS[args.command][0]
    if hasattr(module, "check"):
        try:
            module.check(args)
        except ValueError as exc:
            parsers[args.command].error(str(exc))  # usage and the one-line cause, exit status 2
    return module.run(args)


if __name__ == "__main__":
    sys.exit(main())
