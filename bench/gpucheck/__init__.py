"""The stages of ``bench/gpu_check.py``, one module per stage or group of related stages.

    runner.py          Reporter, the stage table, order and time budgets, the loop that runs them
                       (ONE_CALL_STAGES: issue 28's 9-minute call, m,y,b,c,o,s)
    common.py          what the stages and bench/engine_step.py share (data, bare loop, shapes, MFU
                       in pretrain/flops.py's count)
    optim_stages.py    a (optimizer paths), b (step time), v (kernel variants, loader)
    offload.py         o (ZeRO-Offload), running offload_worker.py in a process of its own
    bare.py            d (bare PyTorch loop)
    engine.py          e and f (bench/engine_step.py in a process of its own)
    runs.py            c and g (pretrain/run.py through the DeepSpeed launcher)
    procs.py           starting, signalling and waiting for those processes
    squad_stage.py     s (SQuAD fine-tuning) and the SQuAD slice bench/prepare_offline.py copies
    efficiency.py      m (run.py at seq 128 and 512, eager/compiled x padded/packed: MFU, fill, ...)
    syncs.py           y (no host sync inside a step; the noise scale's cost)
    sync_worker.py     run.py's cli() with its steps watched for host syncs (run by stage y)

Not entry points: ``./launch.sh bench NAME`` runs bench/NAME.py, never these (sync_worker.py is
started by stage y).
"""
