"""Seed layers in the trainers researchers use: the LocalController driven by a callback.

- `kasmina.integrations.lightning.KasminaCallback`: a `lightning.pytorch.Callback` (extra
  `lightning`).
- `kasmina.integrations.hf.KasminaTrainerCallback`: a `transformers.TrainerCallback` (extra
  `hf`).

Both do what the README's loop does by hand: `controller.step(loss)` after each optimizer step,
`controller.end_epoch(metric, evaluate=...)` at each validation or evaluation during training,
where `evaluate` re-runs the trainer's own validation for the counterfactual passes. Nothing
here is imported by `import kasmina`.
"""
