"""The stages of ``bench/gpu_check.py``, one module per stage or group of related stages.

    runner.py          Reporter, the stage table and order, the loop that runs them
    common.py          what the stages and bench/engine_step.py share (data, bare loop, shapes, MFU)
    optim_stages.py    a (optimizer paths), b (step time), v (kernel variants, loader)
    offload.py         o (ZeRO-Offload), running offload_worker.py in a process of its own
    bare.py            d (bare PyTorch loop)
    engine.py          e and f (bench/engine_step.py in a process of its own)
    runs.py            c and g (pretrain/run.py through the DeepSpeed launcher)
    procs.py           starting, signalling and waiting for those processes
    squad_stage.py     s (SQuAD fine-tuning) and the SQuAD slice bench/prepare_offline.py copies

Not entry points: ``./launch.sh bench NAME`` runs bench/NAME.py, never these.
"""
