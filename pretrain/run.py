"""Two-phase BERT pretraining on DeepSpeed with LAMB.

    deepspeed [--num_gpus N | --hostfile H] pretrain/run.py --config ds_configs/lamb_64k.json \\
        [--data DIR] [--output DIR] [--model NAME|config.json] [--max-steps N] \\
        [--train-batch-size N] [--micro-batch-size N] [--init-checkpoint DIR] [--resume] [--seed S] \\
        [--set KEY=VALUE ...]

Also ``mpiexec -n N python pretrain/run.py ...`` (ranks found through mpi4py) and plain
``python pretrain/run.py ...`` (one process). The config is a DeepSpeed JSON with one extra
``"pretrain"`` block (see ``pretrain/config.py``); flags override its documented keys and the
merged result is saved as OUTPUT/config.effective.json.

Phase 2 (seq 512) is the same script with the phase-2 config and ``--init-checkpoint`` pointing
at phase 1's output: weights always, LAMB moments kept unless ``init_optimizer_state`` is
"reset", a fresh LR schedule and step counter.

``--resume`` continues from the newest complete checkpoint, also on another number of ranks than
wrote it (a requeued job that got fewer or more nodes): the ZeRO-1/2 optimizer state is
re-partitioned (``pretrain/zero_reshard.py``) and the sampler's position converted.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from data_prep.atomic import write_json  # noqa: E402
from pretrain import checkpoint  # noqa: E402
from pretrain import config as config_mod  # noqa: E402
from pretrain import data as data_mod  # noqa: E402
from pretrain import outdir  # noqa: E402
from pretrain.distributed import init_distributed, launcher_rank  # noqa: E402
from pretrain.gns import NoiseScale  # noqa: E402
from pretrain.metrics import MetricsLogger, device_name, mfu_peak, peak_memory_gib  # noqa: E402
from pretrain.model import (bert_config, build_model, check_compile, compile_engine, compiled_graphs,  # noqa: E402
                           count_parameters, load_weights, resolve_compile)
from pretrain.packing import fill_rate  # noqa: E402
from pretrain.steps import StepAccountant, TrainingDiverged  # noqa: E402
from pretrain.stop import StopRequest  # noqa: E402

# Exit codes: 0 finished, or stopped on request with a checkpoint; 2 a bad config or input (one line
# naming it); 3 stopped on non-finite values; EXIT_SAVE_FAILED a checkpoint could not be written
# (one line naming it and the cause; the last complete checkpoint stands, --resume continues there).
EXIT_SAVE_FAILED = 4
# Seconds between SIGTERM and SIGKILL: DeepSpeed's launcher, and Slurm's default KillWait.
STOP_GRACE_S = 30

# Keys whose change would make a resumed run a different run.
RESUME_KEYS = ("optimizer", "scheduler", "train_batch_size", "zero_optimization", "bf16", "fp16",
               "pretrain.model", "pretrain.seq_len", "pretrain.max_predictions", "pretrain.seed", "data.build_id")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="DeepSpeed JSON with a 'pretrain' block")
    ap.add_argument("--data", help="data_prep output for the config's seq len (e.g. data/seq128)")
    ap.add_argument("--output", help="run directory: checkpoints, metrics.jsonl, TensorBoard")
    ap.add_argument("--model", help="preset (bert-tiny, mini, small, medium, base, large) or config.json")
    ap.add_argument("--max-steps", type=int, help="optimizer steps of this phase")
    ap.add_argument("--train-batch-size", type=int, help="global batch (samples per optimizer step)")
    ap.add_argument("--micro-batch-size", type=int, help="samples per forward pass per rank")
    ap.add_argument("--init-checkpoint", help="phase 2: phase 1's output dir, a checkpoint, or an HF export")
    ap.add_argument("--resume", action="store_true",
                    help="continue from the newest complete checkpoint in OUTPUT/checkpoints (any world size)")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override any config key, e.g. --set pretrain.log_every=1 --set zero_optimization.stage=1")
    ap.add_argument("--stop-after", type=int, metavar="N",
                    help="behave as if SIGTERM arrived after step N (checkpoint, exit 0): tests preemption")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    return ap.parse_args(argv)


# Inside RESUME_KEYS, settings that decide what happens to a bad step, not what is trained: a
# resumed run may change them (and runs saved before a config gained them still resume).
NOT_FINGERPRINTED = {"bf16": ("check_grad_overflow",), "fp16": ()}


def fingerprint(ds_cfg: dict, cfg, manifest: dict) -> dict:
    flat = dict(ds_cfg, **{f"pretrain.{k}": v for k, v in asdict(cfg).items()})
    flat["data.build_id"] = manifest.get("build_id")
    picked = {k: flat.get(k) for k in RESUME_KEYS}
    for key, loose in NOT_FINGERPRINTED.items():
        if isinstance(picked.get(key), dict):
            picked[key] = {k: v for k, v in picked[key].items() if k not in loose}
    picked["hash"] = hashlib.sha256(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return picked


def check_output(args, cfg, ds_cfg: dict, manifest: dict) -> bool:
    """Whether this launch resumes; refuses, before any process group or output exists, a run
    over existing checkpoints without --resume, and a --resume with changed settings."""
    busy = outdir.holder(Path(cfg.output))  # another run writes there now (rank 0 locks it below)
    if busy:
        raise config_mod.ConfigError(outdir.busy_message(cfg.output, busy))
    ckpt_dir = Path(cfg.output) / "checkpoints"
    present = checkpoint.checkpoint_dirs(ckpt_dir)
    existing = checkpoint.latest_tag(ckpt_dir)
    if present and not args.resume:
        raise config_mod.ConfigError(f"{cfg.output} already holds checkpoints (latest {existing or 'none complete'}; "
                                     f"{len(present)} checkpoint dirs); pass --resume to continue that run, or choose "
                                     "another --output")
    if args.resume and present and existing is None \
            and not all(checkpoint.unfinished(ckpt_dir / t) for t in present):
        raise config_mod.ConfigError(f"--resume: no complete checkpoint among {', '.join(present)} in {ckpt_dir} "
                                     "(each is unfinished or has missing or truncated files); move them away to start over")
    if args.resume and existing is None:
        if launcher_rank() == 0:
            what = f"only unfinished saves ({', '.join(present)}: removed by the first save)" if present else "no checkpoint"
            print(f"--resume: {what} in {ckpt_dir}; starting from step 0", flush=True)
        return False
    if existing is not None and "train_batch_size" in ds_cfg:
        old = checkpoint.read_marker(ckpt_dir / existing).get("fingerprint") or {}
        if old:
            check_same_settings(old, fingerprint(ds_cfg, cfg, manifest), cfg.output)
    return existing is not None


def check_same_settings(old: dict, new: dict, output) -> None:
    """A resumed run must be the run it continues: refuse changed ``RESUME_KEYS``, naming them."""
    if old.get("hash") != new["hash"]:
        diff = [k for k in RESUME_KEYS if old.get(k) != new.get(k)]
        raise config_mod.ConfigError(f"--resume: {output} was trained with different settings {diff}; "
                                     "use another --output or the original config")


def check_init_vocab(path: str, manifest: dict) -> None:
    """Phase 2 must read the data with phase 1's vocabulary: the same token ids, the same words."""
    data_vocab = manifest.get("vocab", {})
    want_sha, want_size = data_vocab.get("sha256"), int(data_vocab.get("size", 0))
    p = Path(path)
    got_sha = got_size = None
    if (p / "config.json").is_file():  # an HF export
        got_size = json.loads((p / "config.json").read_text()).get("vocab_size")
        if (p / "vocab.txt").is_file():
            from data_prep.vocab import load_vocab

            got_sha = load_vocab(p).sha256
    else:
        ckpt_dir, tag = checkpoint.resolve(p)
        meta_file = ckpt_dir / tag / "model_config.json"
        if meta_file.is_file():
            meta = json.loads(meta_file.read_text())
            got_sha, got_size = meta.get("vocab_sha256"), meta.get("bert", {}).get("vocab_size")
    if (got_sha and want_sha and got_sha != want_sha) or (got_size and got_size != want_size):
        raise config_mod.ConfigError(
            f"--init-checkpoint {path}: trained with another vocabulary ({got_size} tokens"
            + (f", sha256 {got_sha[:12]}" if got_sha else "") + f") than the data's ({want_size} tokens"
            + (f", sha256 {want_sha[:12]}" if want_sha else "") + "): the same token ids would mean other words. "
            "Build phase 2's data with phase 1's vocab (data_prep build --vocab)")


def init_weights(model, path: str, engine_loads_deepspeed: bool) -> tuple[str, Path | None, str | None]:
    """Load phase-1 weights: ("deepspeed", ckpt_dir, tag) or ("hf", None, None).

    With ``engine_loads_deepspeed`` a DeepSpeed checkpoint is only located: the engine's
    ``load_checkpoint`` (which keeping the optimizer state needs anyway) restores the weights, and
    gathering them here first would read every rank's partition for nothing."""
    p = Path(path)
    if (p / "config.json").is_file() and (any(p.glob("*.safetensors")) or any(p.glob("pytorch_model*.bin"))):
        from transformers import BertForPreTraining

        hf = BertForPreTraining.from_pretrained(p)
        load_weights(model, hf.state_dict(), str(p))
        return "hf", None, None
    ckpt_dir, tag = checkpoint.resolve(p)
    if not engine_loads_deepspeed:
        load_weights(model, checkpoint.fp32_state_dict(ckpt_dir, tag), str(ckpt_dir / tag))
    return "deepspeed", ckpt_dir, tag


def resume(engine, stream, output: Path, fp: dict, world: int, is_main: bool) -> tuple[dict, str]:
    """Engine and data position from the newest complete checkpoint: (progress, start-line note)."""
    client = checkpoint.load_resume(engine, output, announce=is_main)
    if client is None:
        raise config_mod.ConfigError(f"--resume: no checkpoint in {output / 'checkpoints'} loads (see the "
                                     "messages above); move them away to start over")
    check_same_settings(client.get("fingerprint", {}), fp, output)
    try:
        stream.load_state_dict(client["sampler"])  # converted when the world size changed
    except ValueError as exc:
        raise config_mod.ConfigError(f"--resume from {client['_tag']}: {exc}") from None
    note = f", resumed from {client['_tag']}"
    if "_saved_world" in client:
        saved = client["_saved_world"]
        note += (f" (written by {saved} rank{'s' * (saved != 1)}: optimizer state re-partitioned onto {world}, "
                 "data position converted; dropout draws differ)")
    return {"step": client["step"], "samples": client["samples"], "skipped": client.get("skipped", 0)}, note


FILL_SAMPLES = 4096  # samples the start line's fill rate is measured on


def fill_note(stream, cfg, micro: int) -> str:
    """The start line's fill rate (real tokens / positions computed) on this rank's next
    ``FILL_SAMPLES`` samples, padded and, with ``pretrain.packing``, packed."""
    lengths = stream.upcoming_lengths(FILL_SAMPLES)
    if len(lengths) < micro:
        return ""
    padded = fill_rate(lengths, micro, cfg.seq_len, None)
    if cfg.packing == "off":
        return f", fill {padded:.3f} (padded rows)"
    pack_len = cfg.pack_len or cfg.seq_len
    packed = fill_rate(lengths, micro, cfg.seq_len, pack_len, cfg.pack_buckets)
    return f", packed ({cfg.packing}) into rows of {pack_len}: fill {packed:.3f} (padded {padded:.3f})"


def init_note(path: str | None, kind: str | None, keep_state: bool) -> str:
    """The start line's account of where phase 2's weights (and moments) came from."""
    if kind is None:
        return ""
    if kind == "hf" and keep_state:  # an export has no optimizer state to keep: say so
        return f", initialised from {path} (hf: weights only, the optimizer starts fresh)"
    return f", initialised from {path} ({kind})"


@torch.no_grad()
def evaluate(engine, dataset, micro: int, samples: int, world: int, rank: int) -> dict:
    """Held-out MLM loss/accuracy and NSP accuracy over a fixed subset, summed over ranks."""
    import deepspeed.comm as dist

    engine.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=engine.device)
    for batch in data_mod.validation_batches(dataset, micro, samples, world, rank):
        out = engine(**{k: v.to(engine.device) for k, v in batch.items()})
        sums += torch.stack([out.mlm_loss.double() * out.mlm_count, out.mlm_count, out.mlm_correct,
                             out.nsp_correct, out.nsp_count]).double()
    engine.train()
    dist.all_reduce(sums)
    loss_sum, n_mlm, mlm_ok, nsp_ok, n_nsp = sums.tolist()
    return {"eval_mlm_loss": loss_sum / max(n_mlm, 1), "eval_mlm_acc": mlm_ok / max(n_mlm, 1),
            "eval_nsp_acc": nsp_ok / max(n_nsp, 1), "eval_samples": int(n_nsp)}


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = {k: getattr(args, k) for k in config_mod.OVERRIDES}
    ds_cfg, cfg = config_mod.load(args.config, overrides, args.set)
    info = data_mod.inspect(cfg, args.config)  # fail on bad data before any process group exists

    import optim

    try:
        precision = optim.resolve_precision(ds_cfg, source=args.config)  # "auto" -> bf16/fp16/fp32
        optim.check_config(ds_cfg)
        bert_config(cfg.model, info.vocab_size)
        check_compile(cfg.compile)
        compile_auto = cfg.compile == "auto"
        cfg.compile = resolve_compile(cfg.compile)  # "auto" by the accelerator: config.effective.json says which
    except ValueError as exc:
        raise config_mod.ConfigError(f"{args.config}: {exc}") from None
    resuming = check_output(args, cfg, ds_cfg, info.manifest)  # refusals before anything is started
    if cfg.init_checkpoint and not resuming:
        check_init_vocab(cfg.init_checkpoint, info.manifest)
    rank, world = init_distributed()
    glob, micro, accum = config_mod.resolve_batch(ds_cfg, world, args.config)
    output = Path(cfg.output)
    is_main = rank == 0

    # -- model, optionally initialised from phase 1; engine: DeepSpeed + our optimizer ----------
    model = build_model(cfg.model, info.vocab_size, cfg.seed)
    n_params = count_parameters(model)
    init_kind = init_ckpt_dir = init_tag = None
    keep_state = cfg.init_optimizer_state != "reset"
    if cfg.init_checkpoint and not resuming:
        init_kind, init_ckpt_dir, init_tag = init_weights(model, cfg.init_checkpoint, keep_state)
    model_meta = json.dumps({"bert": model.config.to_dict(), "vocab_dir": str(info.vocab_dir or ""),
                             "vocab_sha256": info.manifest.get("vocab", {}).get("sha256"),
                             "pretrain": asdict(cfg)}, indent=1)
    effective: dict = {}
    engine, _, _, _ = optim.initialize(model=model, config=ds_cfg, effective=effective)
    if init_kind == "deepspeed" and keep_state:
        checkpoint.restore_phase1_optimizer(engine, init_ckpt_dir, init_tag, cfg.init_optimizer_state)
    compile_note = compile_engine(engine, cfg.compile, dynamic_rows=cfg.packing != "off", auto=compile_auto)

    device = engine.device
    outdir.hold(output, rank, device)  # one run per output, before anything is written there: exit 2 if held
    resuming = checkpoint.from_rank0(resuming, device)  # the ranks may list the checkpoints differently (NFS)
    train_ds, val_ds = data_mod.datasets(info, cfg)
    stream = data_mod.TrainStream(train_ds, micro, world, rank, cfg.seed, cfg.num_workers,
                                  pin_memory=device.type != "cpu", collate_fn=data_mod.packer(cfg, train_ds, micro))
    fp = fingerprint(ds_cfg, cfg, info.manifest)
    progress, resumed = {"step": 0, "samples": 0, "skipped": 0}, ""
    if resuming:
        progress, resumed = resume(engine, stream, output, fp, world, is_main)
    if is_main:  # written once the run is accepted, with every edit made to the config
        output.mkdir(parents=True, exist_ok=True)
        write_json(output / "config.effective.json", config_mod.effective(effective, cfg))
        print(f"pretrain: {cfg.model} ({n_params / 1e6:.1f}M params), seq {cfg.seq_len}, {precision}, "
              f"{len(train_ds):,} train / {len(val_ds) if val_ds else 0:,} held-out samples, world {world}, "
              f"global batch {glob} = {micro} x {accum} accumulation x {world} ranks, "
              f"steps {progress['step']}->{cfg.max_steps}"
              + resumed + init_note(cfg.init_checkpoint, init_kind, keep_state) + fill_note(stream, cfg, micro)
              + compile_note, flush=True)

    from pretrain.flops import FlopRates

    peak, note = mfu_peak(cfg.peak_tflops, device_name(), precision)
    if note and is_main:
        print(f"pretrain: {note}", flush=True)
    run = TrainingRun(args, cfg, engine, stream, val_ds, output, progress, fp, model_meta,
                      glob=glob, micro=micro, accum=accum, world=world, rank=rank,
                      flop_rates=FlopRates.of(model.config), peak_flops=peak * 1e12 if peak else None,
                      min_loss_scale=(ds_cfg.get("fp16") or {}).get("min_loss_scale", 1))
    return run.train(resuming)


class TrainingRun:
    """The loop: micro-batches, steps (applied or skipped), logs, evaluations, checkpoints, stops."""

    def __init__(self, args, cfg, engine, stream, val_ds, output: Path, progress: dict, fp: dict, model_meta: str,
                 *, glob: int, micro: int, accum: int, world: int, rank: int, flop_rates,
                 peak_flops: float | None, min_loss_scale: float) -> None:
        import deepspeed.comm as dist

        self.args, self.cfg, self.engine, self.stream, self.val_ds = args, cfg, engine, stream, val_ds
        self.output, self.progress, self.fp, self.model_meta = output, progress, fp, model_meta
        self.glob, self.micro, self.accum, self.world, self.rank = glob, micro, accum, world, rank
        self.flop_rates, self.peak_flops = flop_rates, peak_flops  # FLOPs per unit of work; one device's peak
        self.is_main = rank == 0
        self.dist = dist
        self.metrics = MetricsLogger(output, self.is_main, cfg.tensorboard, progress["step"])
        self.stop = StopRequest(announce=self.is_main)
        self.step_s, self.grace_checked = 0.0, False  # the last step's seconds; whether check_grace ran
        self.gns = NoiseScale(engine, every=cfg.gns_every, ema=cfg.gns_ema, micro=micro, glob=glob, accum=accum,
                              all_reduce=dist.all_reduce)
        if cfg.gns_every and not self.gns.enabled and self.is_main:
            print("pretrain: gradient noise scale off: it needs at least 2 micro-batches per step "
                  "(gradient accumulation or several ranks)", flush=True)
        lag = 0 if engine.device.type == "cpu" else 1
        self.acct = StepAccountant(engine, engine.device, lag=lag, max_consecutive_skips=cfg.max_consecutive_skips,
                                   min_loss_scale=min_loss_scale,
                                   all_reduce=lambda t: dist.all_reduce(t, op=dist.ReduceOp.MAX))

    def save(self, boundary: tuple | None = None) -> None:
        t = time.perf_counter()
        with self.metrics.paused():
            self._save(boundary)
        if not self.grace_checked and self.step_s:
            self.grace_checked = True
            self.check_grace(time.perf_counter() - t)

    def check_grace(self, save_s: float) -> None:
        """Say once, after the first save, when a stop may not fit in launchers' grace period: it
        is agreed within 2 micro-batches (lag 1) and then saved."""
        stop_s = 2 * self.step_s / self.accum + save_s
        if stop_s > STOP_GRACE_S and self.is_main:
            print(f"pretrain: a stop may take ~{stop_s:.0f} s (2 micro-batches of {self.step_s / self.accum:.1f} s, "
                  f"a save of {save_s:.0f} s), more than the {STOP_GRACE_S} s launchers wait after SIGTERM before "
                  "SIGKILL (DeepSpeed; Slurm's default KillWait): raise KillWait, or have Slurm signal ahead "
                  "(--signal=B:USR1@SECONDS)", flush=True)

    def _save(self, boundary: tuple | None = None) -> None:
        """``boundary``: (sampler state, RNG states) where an unfinished step began, for a stop
        mid-step: the checkpoint is the last complete step's, and a resume repeats the dropped
        micro-batches with the same dropout."""
        p = self.progress
        sampler, rng = boundary or (self.stream.state_dict(), None)
        client_state = {"step": p["step"], "samples": p["samples"], "skipped": p["skipped"],
                        "sampler": sampler, "fingerprint": self.fp}
        tag_dir = checkpoint.save(self.engine, self.output, p["step"], client_state, self.model_meta,
                                  self.cfg.keep_checkpoints, rng=rng)
        if self.cfg.export_on_save and self.is_main:
            from pretrain.export import export

            export(tag_dir, self.output / "hf")
        if self.is_main:
            print(f"checkpoint: {tag_dir}", flush=True)

    def stop_mid_step(self, boundary: tuple, done: int) -> int:
        """A stop agreed between micro-batches: the unfinished step is dropped (its gradients are
        never applied) and the last complete step saved as it ended."""
        self.acct.drop_partial_step()
        self.acct.flush()  # the complete steps' flags: a non-finite loss or norm stops here, unsaved (exit 3)
        if self.acct.interval_steps:
            self.log()
        self.save(boundary)
        cause = self.stop_cause()
        if self.is_main:
            print(f"pretrain: stopped at step {self.progress['step']} on request ({cause}); step "
                  f"{self.progress['step'] + 1} dropped after {done} of {self.accum} micro-batches; rerun with "
                  "--resume to continue", flush=True)
        return 0

    def stop_cause(self) -> str:
        """Why the run stops, as the ranks saw it (one gather, at the stop): a signal or a launcher
        gone, with the ranks it reached when not all, or --stop-after."""
        reasons = [""] * self.world
        self.dist.all_gather_object(reasons, self.stop.reason)
        if not any(reasons):
            return "--stop-after"
        if len(set(reasons)) == 1:
            return reasons[0]  # every rank alike: a signal to the group, or forwarded by the launcher
        ranks: dict[str, list[int]] = {}
        for r, why in enumerate(reasons):
            if why:
                ranks.setdefault(why, []).append(r)
        return "; ".join(f"rank{'s' * (len(rs) > 1)} {', '.join(map(str, rs))}: {why}" for why, rs in ranks.items())

    def log(self) -> None:
        iv = self.acct.take_interval(self.dist.all_reduce)
        elapsed = max(self.metrics.elapsed(), 1e-9)
        p = self.progress
        record = {"step": p["step"], "loss": iv["loss_sum"] / max(iv["micro_batches"], 1),
                  "mlm_loss": iv["mlm_loss_sum"] / iv["mlm_count"] if iv["mlm_count"] else None,
                  "nsp_loss": iv["nsp_loss_sum"] / iv["nsp_count"] if iv["nsp_count"] else None,
                  "mlm_acc": iv["mlm_correct"] / max(iv["mlm_count"], 1),
                  "nsp_acc": iv["nsp_correct"] / max(iv["nsp_count"], 1), "lr": self.engine.get_lr()[0],
                  "samples_per_s": iv["samples"] / elapsed, "tokens_per_s": iv["tokens"] / elapsed,
                  "fill": iv["tokens"] / iv["positions"] if iv["positions"] else None,  # real / computed
                  **self.utilisation(iv, elapsed),
                  "data_wait": self.stream.take_wait() / elapsed,
                  "peak_mem_gib": peak_memory_gib(), "loss_scale": self.acct.loss_scale(),
                  "skipped_steps": p["skipped"], "epoch": self.stream.epoch, "samples": p["samples"],
                  "compiled_graphs": compiled_graphs(),  # grows at a recompilation (a new shape or guard)
                  **self.gns.record()}
        trust = getattr(self.engine.basic_optimizer, "trust_ratios", lambda: {})()
        every = self.cfg.trust_ratio_histogram_every
        self.metrics.log(record, trust=trust, histogram=bool(every) and p["step"] % every == 0)
        self.metrics.restart_clock()  # the next record's interval starts now (its data wait was just taken)

    def utilisation(self, iv: dict, elapsed: float) -> dict:
        """``mfu`` and ``hfu`` of the interval (``pretrain/flops.py``, summed over ranks, over the
        peak of all ranks), with the counts behind them."""
        work = {k: iv[k] for k in ("tokens", "pairs", "masked", "samples", "positions", "pairs_executed",
                                   "masked_slots")}
        peak = self.peak_flops * self.world if self.peak_flops else None
        return {"mfu": self.flop_rates.model_flops(work) / elapsed / peak if peak else None,
                "hfu": self.flop_rates.executed_flops(work) / elapsed / peak if peak else None,
                "interval_s": elapsed, "work": work}

    def evaluate(self) -> None:
        with self.metrics.paused():
            self.metrics.log({"step": self.progress["step"], **evaluate(self.engine, self.val_ds, self.micro,
                                                                       self.cfg.eval_samples, self.world, self.rank)})

    def train(self, resuming: bool) -> int:
        cfg, engine, p = self.cfg, self.engine, self.progress
        device = engine.device
        last_saved = p["step"] if resuming else -1
        try:
            while p["step"] < cfg.max_steps:
                self.gns.begin_step(p["step"] + 1, self.acct.loss_scale())
                started = time.perf_counter()
                # where a stop agreed mid-step goes back to (the data position and RNG of this step's start)
                boundary = (self.stream.state_dict(), checkpoint.rng_state()) if self.accum > 1 else None
                for i in range(self.accum):
                    batch = {k: v.to(device, non_blocking=True) for k, v in self.stream.next().items()}
                    out = engine(**batch)
                    engine.backward(out.loss)
                    self.gns.end_micro(boundary=i == self.accum - 1)
                    self.acct.optimizer_step(boundary=i == self.accum - 1)  # engine.step(), its failures named
                    self.acct.micro_batch(out, batch)
                    if i < self.accum - 1 and self.acct.stop_between_micro_batches(self.stop.poll()):
                        return self.stop_mid_step(boundary, i + 1)
                self.step_s = time.perf_counter() - started
                p["samples"] += self.glob
                # --stop-after N: requested so that the stop lands after step N, lag included
                requested = self.stop.poll() or (self.args.stop_after is not None
                                                 and p["step"] + 1 + self.acct.lag >= self.args.stop_after)
                outcome = self.acct.end_step(requested)
                self.gns.end_step(outcome.applied)
                if outcome.applied:
                    p["step"] += 1
                else:
                    p["skipped"] += 1
                    if self.is_main and self.acct.fp16:
                        print(f"step {p['step'] + 1}: skipped by the fp16 loss scaler (scale now "
                              f"{self.acct.loss_scale():g}, {p['skipped']} skipped so far)", flush=True)
                    elif self.is_main:  # bf16 with DeepSpeed's own gradient scan on
                        print(f"step {p['step'] + 1}: skipped by DeepSpeed: inf or NaN in the gradients "
                              f"({p['skipped']} skipped so far)", flush=True)
                step, stopping = p["step"], outcome.stop
                if outcome.applied and step == cfg.max_steps:
                    stopping |= self.acct.flush()  # the run's last flags: a non-finite loss or norm stops it here
                if stopping or (outcome.applied and (step % cfg.log_every == 0 or step == cfg.max_steps)):
                    self.log()
                if outcome.applied and self.val_ds is not None and cfg.eval_every and step % cfg.eval_every == 0 \
                        and step < cfg.max_steps:
                    self.evaluate()
                every = cfg.checkpoint_every  # 0: only at the end and on a stop
                checkpoint_due = step == cfg.max_steps or (every > 0 and step % every == 0)
                if stopping or (outcome.applied and checkpoint_due):
                    # Every step's flags (non-finite loss or gradient norm) read first: a checkpoint of
                    # diverged weights would be marked complete and could prune the good ones (one sync
                    # per checkpoint).
                    stopping |= self.acct.flush()
                    self.save()
                    last_saved = step
                if stopping:
                    cause = self.stop_cause()
                    if self.is_main:
                        print(f"pretrain: stopped at step {step} on request ({cause}); "
                              "rerun with --resume to continue", flush=True)
                    return 0
            if self.val_ds is not None:
                self.evaluate()
            if last_saved != p["step"]:
                self.save()
        except TrainingDiverged as exc:
            if self.is_main:
                print(f"pretrain: {exc} (at step {p['step']}). Last checkpoint: "
                      f"{checkpoint.latest_tag(self.output / 'checkpoints') or 'none'}", file=sys.stderr, flush=True)
            return 3
        except checkpoint.SaveFailed as exc:  # raised on every rank alike
            self.metrics.close()
            if str(exc):
                print(f"pretrain: {exc}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            # Not a return: at interpreter exit the rank would wait for its DataLoader workers, which
            # ignore SIGTERM; without their rank they leave by themselves (PyTorch's worker watchdog).
            os._exit(EXIT_SAVE_FAILED)
        finally:
            self.metrics.close()
        if self.is_main:
            print(f"pretrain: done, {p['step']} steps; checkpoints in {self.output / 'checkpoints'}", flush=True)
        return 0


def cli(argv=None) -> int:
    try:
        return main(argv)
    except (config_mod.ConfigError, FileNotFoundError) as exc:
        if launcher_rank() == 0:  # every rank finds the same error: one line, not N
            print(f"pretrain: {exc}", file=sys.stderr, flush=True)
        return 2


# Messages of a collective whose peer is gone (gloo, NCCL): this rank is not the one that failed.
PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "NCCL communicator was aborted",
             "Broken pipe", "remote process exited")


def entry() -> None:
    """The process entry point. A crash must not leave the process waiting at exit for its
    DataLoader workers: they ignore SIGTERM (a stop signal is the rank's), so multiprocessing's
    exit handler, which terminates them with SIGTERM and joins them, would wait for ever (and a
    launcher only SIGKILLs 30 s later). Say what happened and leave at once."""
    try:
        code = cli()
    except Exception as exc:  # noqa: BLE001 - any crash: reported, then a prompt exit
        rank = os.environ.get("RANK", str(launcher_rank()))
        if any(m in str(exc) for m in PEER_LOST):
            print(f"pretrain: rank {rank}: lost contact with another rank ({type(exc).__name__}: "
                  f"{str(exc).splitlines()[0][:200]}); the rank that failed says why", file=sys.stderr, flush=True)
        else:
            import traceback

            traceback.print_exc()
            print(f"pretrain: rank {rank} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
    sys.exit(code)


if __name__ == "__main__":
    entry()
