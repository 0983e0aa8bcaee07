"""sdar_engine: a lean trainer for SDAR (GRPO + gated on-policy self-distillation).

Modules, one concept each: config (the validated config tree), model / tokenizer (policies),
packing / logprobs / update / optim / checkpoint / distributed (the step's machinery),
rollout / teacher / advantages / warmstart (the RL data), batch (a step's episodes over ranks),
trainer / metrics (the loop),
demo / cli (the ``sdar`` command). Imports are lazy: ``import sdar_engine`` is cheap.
"""
__version__ = "0.1.0"
__all__ = ["__version__"]
