"""Adversarial training of deqguard models, with the paper's regulation, from presets.

Modules (imported on demand, so `deqguard --help` stays light):
    data        datasets, the carved validation split, seeded augmentation, fingerprints
    config      the typed training config, presets (presets/*.yaml) and --set overrides
    objectives  standard CE, PGD-AT, TRADES; random solver depth (Sec 3.3); Jacobian term
    attacks     L-inf PGD shared with evaluation
    loop        the run (`train`, `Trainer`), built from the next five
    seeds       every random draw from (seed, epoch, step, rank), so a resumed run repeats
    run_setup   device, model config, optimizer and learning-rate schedule
    epoch       the training step and the epoch with its validation
    run_files   checkpoints, train_log.jsonl and the resume state of a run's folder
    selection   the best epoch, the overfitting stop, the final test-set check
    overfit_guard  the catastrophic-overfitting test of single-step training
    device_window  `deqguard window`: several presets trained and evaluated before a deadline
    validation  clean/PGD accuracy and solver convergence for model selection
    distributed data parallelism under torchrun
    cli         `deqguard train`

Judging a trained checkpoint (`deqguard eval`, `deqguard detect`) lives in `deqguard.evaluation`,
which imports this package; nothing here imports it back.
"""
