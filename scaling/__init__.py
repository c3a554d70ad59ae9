"""The batch-size scaling study: how many steps and samples BERT pretraining needs to reach a loss
at each batch size, with LAMB, LARS and AdamW, and where a larger batch stops buying fewer steps.

    python -m scaling grid     the same samples at several batch sizes and optimizers, with a
                               learning-rate search: steps to a target loss, tables and plots
    python -m scaling confirm  a finished grid's best learning rates again with fresh seeds: their
                               spread, steps to training-loss targets, the critical batch
    python -m scaling predict  nothing trains: from one run's gradient noise scale, the steps other
                               batch sizes need to reach the loss it reached

Each command has its own ``--help``. Every run is ``pretrain/run.py`` as a child process; the study
reads what the runs write (``pretrain.metrics``), and training never imports the study. Plots need
matplotlib (``pip install .[study]``); without it everything else is written.
"""
