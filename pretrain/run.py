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
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pretrain import checkpoint  # noqa: E402
from pretrain import config as config_mod  # noqa: E402
from pretrain import data as data_mod  # noqa: E402
from pretrain.metrics import MetricsLogger  # noqa: E402
from pretrain.model import build_model, count_parameters, load_weights  # noqa: E402

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
    ap.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoints/latest")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override any config key, e.g. --set pretrain.log_every=1 --set zero_optimization.stage=1")
    ap.add_argument("--stop-after", type=int, metavar="N",
                    help="behave as if SIGTERM arrived after step N (checkpoint, exit 0): tests preemption")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    return ap.parse_args(argv)


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the next step and exits."""

    def __init__(self) -> None:
        self.signal = 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, _frame) -> None:
        if self.signal:  # second signal: give up at once
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\nreceived {signal.Signals(signum).name}: saving a checkpoint after this step", flush=True)


def fingerprint(ds_cfg: dict, cfg, manifest: dict) -> dict:
    flat = dict(ds_cfg, **{f"pretrain.{k}": v for k, v in asdict(cfg).items()})
    flat["data.build_id"] = manifest.get("build_id")
    picked = {k: flat.get(k) for k in RESUME_KEYS}
    picked["hash"] = hashlib.sha256(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return picked


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

    import deepspeed
    import deepspeed.comm as dist

    import optim

    # A process started without a launcher binds DeepSpeed's default port unless told otherwise;
    # honouring MASTER_PORT lets several single-process runs share a machine.
    deepspeed.init_distributed(distributed_port=int(os.environ.get("MASTER_PORT", 29500)))
    world, rank = dist.get_world_size(), dist.get_rank()
    glob, micro, accum = config_mod.resolve_batch(ds_cfg, world, args.config)
    output = Path(cfg.output)
    is_main = rank == 0
    if is_main:
        output.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_write_text(output / "config.effective.json",
                                     json.dumps(config_mod.effective(ds_cfg, cfg), indent=1))
    existing = checkpoint.latest_tag(output / "checkpoints")
    if existing and not args.resume:
        raise config_mod.ConfigError(f"{output} already holds checkpoints (latest {existing}); pass --resume to "
                                     "continue that run, or choose another --output")
    resuming = args.resume and existing is not None
    if args.resume and not resuming and is_main:
        print(f"--resume: no checkpoint in {output / 'checkpoints'}; starting from step 0", flush=True)

    # -- model, optionally initialised from phase 1 ------------------------------------------
    model = build_model(cfg.model, info.vocab_size, cfg.seed)
    init_kind = init_ckpt_dir = init_tag = None
    if cfg.init_checkpoint and not resuming:
        init_kind, init_ckpt_dir, init_tag = init_weights(model, cfg.init_checkpoint,
                                                          cfg.init_optimizer_state == "keep")
    model_meta = json.dumps({"bert": model.config.to_dict(), "vocab_dir": str(info.vocab_dir or ""),
                             "pretrain": asdict(cfg)}, indent=1)

    # -- engine: DeepSpeed + our optimizer and schedule (optim.initialize) --------------------
    engine, _, _, _ = optim.initialize(model=model, config=ds_cfg)
    if init_kind == "deepspeed" and cfg.init_optimizer_state == "keep":
        # Loading the optimizer also restores phase 1's param-group settings, among them its last
        # learning rate (0 at the end of a decay to zero). Phase 2 keeps the moments and step
        # counts only; its learning rate, schedule start and hyperparameters are its own config's
        # (as NVIDIA's phase 2 overrides them after loading).
        own_settings = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
        try:
            engine.load_checkpoint(str(init_ckpt_dir), tag=init_tag, load_optimizer_states=True,
                                   load_lr_scheduler_states=False)
        except (RuntimeError, ValueError, KeyError, AssertionError) as exc:
            raise config_mod.ConfigError(
                f"cannot restore the optimizer state of {init_ckpt_dir / init_tag} ({type(exc).__name__}: "
                f"{str(exc)[:200]}); ZeRO partitions the state by rank, so phase 2 must keep phase 1's "
                "world size and ZeRO stage, or set pretrain.init_optimizer_state to \"reset\"") from None
        for group, settings in zip(engine.optimizer.param_groups, own_settings):
            group.update(settings)
        engine.global_steps = engine.global_samples = engine.skipped_steps = 0  # new phase, new count

    train_ds, val_ds = data_mod.datasets(info, cfg)
    stream = data_mod.TrainStream(train_ds, micro, world, rank, cfg.seed, cfg.num_workers)
    fp = fingerprint(ds_cfg, cfg, info.manifest)
    start_step, samples_seen = 0, 0
    if resuming:
        client = checkpoint.load_resume(engine, output)
        old = client.get("fingerprint", {})
        if old.get("hash") != fp["hash"]:
            diff = [k for k in RESUME_KEYS if old.get(k) != fp.get(k)]
            raise config_mod.ConfigError(f"--resume: {output} was trained with different settings {diff}; "
                                         "use another --output or the original config")
        start_step, samples_seen = client["step"], client["samples"]
        stream.load_state_dict(client["sampler"])
    if is_main:
        print(f"pretrain: {cfg.model} ({count_parameters(model) / 1e6:.1f}M params), seq {cfg.seq_len}, "
              f"{len(train_ds):,} train / {len(val_ds) if val_ds else 0:,} held-out samples, world {world}, "
              f"global batch {glob} = {micro} x {accum} accumulation x {world} ranks, "
              f"steps {start_step}->{cfg.max_steps}"
              + (f", resumed from {client['_tag']}" if resuming else "")
              + (f", initialised from {cfg.init_checkpoint} ({init_kind})" if init_kind else ""), flush=True)

    metrics = MetricsLogger(output, is_main, cfg.tensorboard, start_step)
    stop = StopRequest()
    device = engine.device

    def save(step: int) -> None:
        client_state = {"step": step, "samples": samples_seen, "sampler": stream.state_dict(), "fingerprint": fp}
        tag_dir = checkpoint.save(engine, output, step, client_state, model_meta, cfg.keep_checkpoints)
        if cfg.export_on_save and is_main:
            from pretrain.export import export

            export(tag_dir, output / "hf")
        if is_main:
            print(f"checkpoint: {tag_dir}", flush=True)

    # -- the loop ---------------------------------------------------------------------------
    stats = torch.zeros(6, dtype=torch.float64, device=device)  # loss, micro, mlm ok/n, nsp ok/n
    interval_steps, last_saved = 0, start_step if resuming else -1
    step = start_step
    while step < cfg.max_steps:
        for _ in range(accum):
            batch = {k: v.to(device, non_blocking=True) for k, v in stream.next().items()}
            out = engine(**batch)
            engine.backward(out.loss)
            engine.step()
            stats += torch.stack([out.loss.detach().double(), torch.ones((), dtype=torch.float64, device=device),
                                  out.mlm_correct.double(), out.mlm_count.double(),
                                  out.nsp_correct.double(), out.nsp_count.double()])
        step += 1
        interval_steps += 1
        samples_seen += glob
        # One small collective per step: any rank signalled, or saw a non-finite loss?
        stop_now = stop.signal != 0 or (args.stop_after is not None and step >= args.stop_after)
        flags = torch.tensor([float(stop_now), float(not torch.isfinite(out.loss).item())], device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[1] > 0:
            if is_main:
                print(f"pretrain: non-finite loss at step {step}. Lower the learning rate or lengthen warmup; "
                      "with fp16, check the loss scale. Last checkpoint: "
                      f"{checkpoint.latest_tag(output / 'checkpoints') or 'none'}", file=sys.stderr, flush=True)
            metrics.close()
            return 3
        if step % cfg.log_every == 0 or step == cfg.max_steps or flags[0] > 0:
            dist.all_reduce(stats)
            loss_sum, n_micro, mlm_ok, mlm_n, nsp_ok, nsp_n = stats.tolist()
            elapsed = max(metrics.elapsed(), 1e-9)
            trust = getattr(engine.basic_optimizer, "trust_ratios", lambda: {})()
            scale = getattr(engine.optimizer, "cur_scale", None) if engine.fp16_enabled() else None
            metrics.log({"step": step, "loss": loss_sum / n_micro, "mlm_acc": mlm_ok / max(mlm_n, 1),
                         "nsp_acc": nsp_ok / max(nsp_n, 1), "lr": engine.get_lr()[0],
                         "samples_per_s": interval_steps * glob / elapsed,
                         "tokens_per_s": interval_steps * glob * cfg.seq_len / elapsed,
                         "loss_scale": scale, "epoch": stream.epoch, "samples": samples_seen},
                        trust=trust, histogram=bool(cfg.trust_ratio_histogram_every)
                        and step % cfg.trust_ratio_histogram_every == 0)
            stats.zero_()
            interval_steps = 0
            metrics.restart_clock()
        if val_ds is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
            metrics.log({"step": step, **evaluate(engine, val_ds, micro, cfg.eval_samples, world, rank)})
            metrics.restart_clock()
        if flags[0] > 0 or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.max_steps:
            save(step)
            last_saved = step
            metrics.restart_clock()
        if flags[0] > 0:
            if is_main:
                print(f"pretrain: stopped at step {step} on request; rerun with --resume to continue", flush=True)
            metrics.close()
            return 0
    if val_ds is not None:
        metrics.log({"step": step, **evaluate(engine, val_ds, micro, cfg.eval_samples, world, rank)})
    if last_saved != step:
        save(step)
    if is_main:
        print(f"pretrain: done, {step} steps; checkpoints in {output / 'checkpoints'}", flush=True)
    metrics.close()
    return 0


def cli() -> int:
    try:
        return main()
    except (config_mod.ConfigError, FileNotFoundError) as exc:
        print(f"pretrain: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
