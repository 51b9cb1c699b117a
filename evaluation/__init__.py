"""Evaluation of a checkpoint: attacks, AutoAttack, detection, selective answers, the report, and
the `deqguard eval` and `deqguard detect` commands.

It is a room of its own, next to `training/`, and imports run one way: evaluation builds on
training's pieces (the datasets and their validation split in `training.data`, the PGD of
`training.attacks`) and on `models`, while nothing in training imports evaluation, so a training
run never loads the evaluation code. `deqguard window` judges its runs by running the
`deqguard eval` command in a subprocess, not by importing this package.

Modules (imported on demand, so `deqguard --help` stays light):
    schema      the `EvalReport` JSON: every number next to the settings that produced it
    attacks     white-box and adaptive attacks, each naming its gradient path; worst case
    autoattack  standard AutoAttack through `pyautoattack`, one attack at a time
    detection   trajectories of clean and attacked inputs, scores, ROC, calibration
    selective   risk-coverage of the doubt scores (selective answers) and their calibration;
                with risk_coverage (the curve and its area), bootstrap (intervals) and
                selective_report (its plots and table)
    runner      one evaluation run, part by part, into an `EvalReport` (`evaluate`); the
                parts share `state` and live in robustness (clean accuracy to the worst case)
                and detection_part (detection, selective answers)
    report      Markdown summary and PNG plots of a report, from the JSON alone
    advsets     adversarial image sets crafted once and cached, for detectors and benchmarks
    detector_fit, detector_attack
                the learned detector: fitting on clean vs attacked dynamics, and the attack
                that knows it
    cli         the `deqguard eval` parser (its choices in `choices`); the handler in
                eval_command, with eval_settings (options -> settings) and eval_summary
                (the printed summary)
    detector_cli  `deqguard detect`
"""
