"""Adversarial training of deqguard models, with the paper's regulation, from presets.

Modules (imported on demand, so `deqguard --help` stays light):
    data        datasets, the carved validation split, seeded augmentation, fingerprints
    config      the typed training config, presets (presets/*.yaml) and --set overrides
    objectives  standard CE, PGD-AT, TRADES; random solver depth (Sec 3.3); Jacobian term
    attacks     L-inf PGD shared with evaluation
    loop        the run: epochs, validation, checkpoints, resumption (`train`, `Trainer`)
    validation  clean/PGD accuracy and solver-budget sweeps for model selection
    distributed data parallelism under torchrun
    cli         `deqguard train`

Judging a trained checkpoint (`deqguard eval`, `deqguard detect`) lives in `deqguard.evaluation`,
which imports this package; nothing here imports it back.
"""
