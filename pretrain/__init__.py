"""Two-phase BERT pretraining on DeepSpeed (``pretrain/run.py``), checkpoints and HF export."""
