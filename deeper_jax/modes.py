"""Training, evaluation and export as modes of one program (as in BYOL)."""
from __future__ import annotations


from absl import logging

from deeper_jax import train


def run(mode: str, config, workdir: str):
  if mode == "train":
    return train.train_and_evaluate(config, workdir)
  from deeper_jax import export_eval  # only these modes need the eval suite
  if mode == "eval":
    return export_eval.evaluate_workdir(config, workdir)
  if mode == "export":
    path = export_eval.export_workdir(config, workdir)
    logging.info("exported to %s", path)
    return path
  raise ValueError(f"--mode={mode!r} is unknown; use train, eval or export.")
