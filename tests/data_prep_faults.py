"""``python -m data_prep`` with a fault injected into its build, for the resume tests of
``tests/test_data_prep.py``; the fault injection lives here, data_prep has no hook for it.

    python tests/data_prep_faults.py kill N build --input ... --output ...
    python tests/data_prep_faults.py interrupt N build ...

A tokenize worker, right after it has finished (committed) its N-th file, either SIGKILLs the
build, its parent and then itself, as a power cut or ``kill -9`` of the job would (``kill``), or
sends the parent SIGINT, as Ctrl-C in the terminal would, and holds still until the parent stops
it (``interrupt``): the crash comes at an exact point, so the tests can count what was kept.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep import pipeline  # noqa: E402
from data_prep.__main__ import main  # noqa: E402

FAULTS = ("kill", "interrupt")
_tokenize_unit = pipeline._tokenize_unit
_finished = 0  # files this worker process has tokenized


def _tokenize_then_fault(job) -> dict:
    """data_prep's tokenize job, then the fault after this worker's N-th file. The fault is read
    from the command line here, in the worker: a forked or spawned worker has the parent's argv."""
    global _finished
    fault, after = sys.argv[1], int(sys.argv[2])
    meta = _tokenize_unit(job)
    _finished += 1
    if _finished == after:
        if fault == "interrupt":
            os.kill(os.getppid(), signal.SIGINT)
            time.sleep(15)  # the parent terminates its workers on Ctrl-C: no further file is started
            return meta
        os.kill(os.getppid(), signal.SIGKILL)
        os._exit(137)
    return meta


if __name__ == "__main__":
    if len(sys.argv) < 4 or sys.argv[1] not in FAULTS or not sys.argv[2].isdigit():
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(FAULTS)}}} N DATA_PREP_ARGS...")
    pipeline._tokenize_unit = _tokenize_then_fault  # build() submits this to its worker pool
    sys.exit(main(sys.argv[3:]))
