"""Evaluation of a checkpoint: attacks, AutoAttack, detection, the report and `deqguard eval`.

It sits under `training/` as `deqguard.training.evaluation`, not in a top-level `evaluation/`,
because it is built on training's pieces (the datasets and their validation split in
`training.data`, the PGD of `training.attacks`) and is how a training run is judged; the top
level stays the design card's (`training/ serving/ models/ clients/`). Nothing in training
imports it, so a training run never loads the evaluation code.

Modules (imported on demand, so `deqguard --help` stays light):
    schema      the `EvalReport` JSON: every number next to the settings that produced it
    attacks     white-box and adaptive attacks, each naming its gradient path; worst case
    autoattack  standard AutoAttack through `pyautoattack`, one attack at a time
    detection   trajectories of clean and attacked inputs, scores, ROC, calibration
    selective   risk-coverage of the doubt scores (selective answers) and their calibration;
                with risk_coverage (the curve and its area), bootstrap (intervals) and
                selective_report (its plots and table)
    runner      one evaluation run, part by part, into an `EvalReport` (`evaluate`)
    report      Markdown summary and PNG plots of a report, from the JSON alone
    cli         `deqguard eval`
"""
