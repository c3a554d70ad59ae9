"""``pretrain/run.py`` with its training steps watched for host synchronisation (stage y).

    python bench/gpucheck/sync_worker.py RESULT.json --after N -- RUN.PY-ARGS...

Runs run.py's own ``cli()`` in this process: the real config, data loader, engine and
``TrainingRun`` loop. From the end of step ``N`` on, every host sync outside the places that
synchronise by design (the log, evaluation, checkpoint and stop code, and the read of the step
flags' host copy, ``StepAccountant._read``, made behind an event a step later) is an error:

* on CUDA, ``torch.cuda.set_sync_debug_mode("error")``: PyTorch raises at the first synchronising
  call (``.item()``, a blocking copy, ``torch.cuda.synchronize``, ``nonzero``, ...);
* elsewhere (the CPU: --smoke), a dispatch mode records each tensor value read
  (``aten._local_scalar_dense``: ``.item()``, ``bool()``, ``float()``) and each tensor made from
  Python data (``aten.lift_fresh``: ``torch.tensor(...)``), what those calls cost on a GPU.

RESULT.json gets {"mode", "armed_at_step", "steps_watched", "events": [{"what", "step", "where"}]};
the exit status is run.py's, or 1 when the CUDA check raised (its traceback in "events").
Not an entry point for users: bench/gpu_check.py --stages y runs it.
"""
from __future__ import annotations

import functools
import json
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

# (class, method) whose calls synchronise by design: the watch is paused inside them
ALLOWED = (("TrainingRun", "log"), ("TrainingRun", "evaluate"), ("TrainingRun", "save"),
           ("TrainingRun", "stop_cause"), ("StepAccountant", "flush"), ("StepAccountant", "_read"))
SYNC_OPS = {torch.ops.aten._local_scalar_dense.default: "a tensor's value read (.item/bool/float/int)",
            torch.ops.aten.lift_fresh.default: "torch.tensor() of Python data"}


def where() -> list[str]:
    """The repository's own frames of the current stack (not its venv's), innermost last."""
    repo = str(Path(__file__).resolve().parents[2])
    return [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in traceback.extract_stack()[:-2]
            if f.filename.startswith(repo) and "site-packages" not in f.filename and "gpucheck" not in f.filename][-5:]


class Watch:
    """Armed after ``after`` optimizer steps; paused (nestably) inside the ALLOWED methods."""

    def __init__(self, after: int, cuda: bool) -> None:
        self.after, self.cuda = after, cuda
        self.steps = 0
        self.armed = False
        self.paused = 0
        self.events: list[dict] = []

    @property
    def on(self) -> bool:
        return self.armed and not self.paused

    def _apply(self) -> None:
        if self.cuda:
            torch.cuda.set_sync_debug_mode("error" if self.on else "default")

    def step_ended(self) -> None:
        self.steps += 1
        if self.steps == self.after:
            self.arm()

    def arm(self) -> None:
        self.armed = True
        self._apply()

    def pause(self) -> None:
        self.paused += 1
        self._apply()

    def resume(self) -> None:
        self.paused -= 1
        self._apply()

    def disarm(self) -> None:
        self.armed = False
        self._apply()

    def note(self, what: str) -> None:
        if self.on:
            self.events.append({"what": what, "step": self.steps + 1, "where": where()})


class Recorder(TorchDispatchMode):
    """The CPU's stand-in for CUDA's sync debug mode: records SYNC_OPS while the watch is on."""

    def __init__(self, watch: Watch) -> None:
        super().__init__()
        self.watch = watch

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNC_OPS:
            self.watch.note(SYNC_OPS[func])
        return func(*args, **(kwargs or {}))


class ToList(TorchFunctionMode):
    """``.tolist()`` reads values without passing the dispatcher's _local_scalar_dense."""

    def __init__(self, watch: Watch) -> None:
        super().__init__()
        self.watch = watch

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.tolist:
            self.watch.note(".tolist()")
        return func(*args, **(kwargs or {}))


def install(watch: Watch) -> None:
    """Wrap run.py's loop: the watch arms after step ``after`` (StepAccountant.end_step), pauses
    in the ALLOWED methods, disarms when train() returns; on the CPU the recorders wrap train()."""
    from pretrain import run, steps

    classes = {"TrainingRun": run.TrainingRun, "StepAccountant": steps.StepAccountant}

    def paused(method):
        @functools.wraps(method)
        def inner(*a, **kw):
            watch.pause()
            try:
                return method(*a, **kw)
            finally:
                watch.resume()
        return inner

    for cls, name in ALLOWED:
        setattr(classes[cls], name, paused(getattr(classes[cls], name)))
    end_step = steps.StepAccountant.end_step

    @functools.wraps(end_step)
    def counted_end_step(self, *a, **kw):
        outcome = end_step(self, *a, **kw)
        watch.step_ended()
        return outcome

    steps.StepAccountant.end_step = counted_end_step
    train = run.TrainingRun.train

    @functools.wraps(train)
    def watched_train(self, *a, **kw):
        if watch.after == 0:  # from the first step on
            watch.arm()
        try:
            if watch.cuda:
                return train(self, *a, **kw)
            with Recorder(watch), ToList(watch):
                return train(self, *a, **kw)
        finally:
            watch.disarm()

    run.TrainingRun.train = watched_train


def main(argv: list[str]) -> int:
    result_path, rest = Path(argv[0]), argv[1:]
    after = int(rest[rest.index("--after") + 1])
    run_args = rest[rest.index("--") + 1:]
    cuda = torch.cuda.is_available()
    watch = Watch(after, cuda)
    install(watch)
    from pretrain import run

    rc: int = 1
    try:
        rc = run.cli(run_args)
    except RuntimeError as exc:  # the CUDA sync debug mode's error (or another failure: reported alike)
        watch.events.append({"what": f"{type(exc).__name__}: {str(exc)[:500]}", "step": watch.steps + 1,
                             "where": traceback.format_exc()[-3000:].splitlines()})
        traceback.print_exc()
    result = {"mode": "cuda set_sync_debug_mode('error')" if cuda else "cpu dispatch recorder",
              "armed_at_step": after, "steps_watched": max(watch.steps - after, 0), "events": watch.events}
    result_path.write_text(json.dumps(result, indent=1))
    return 1 if watch.events and cuda else rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
