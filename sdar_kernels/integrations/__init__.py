"""Adapters that run sdar_kernels inside other RL codebases.

Each adapter lives in its own module and imports its peer only when imported itself, so
``import sdar_kernels.integrations`` costs nothing:

    from sdar_kernels.integrations.trl import SDARGRPOTrainer   # needs trl (tested with 1.16.0)
"""
