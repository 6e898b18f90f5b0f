"""The PyTorch side: Director's transformers on diffusers' modules (``modules``), the Director-Gen pipeline from
exported weights (``pipeline``; ``python -m director_jax.pytorch`` runs it), and ``SmartDirectorPipeline``
(``smart_pipeline``), the diffusers ``DiffusionPipeline`` over a ``convert export --model pipeline`` directory.

Imported lazily: ``import director_jax.pytorch`` alone does not import torch.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("SmartDirectorPipeline", "SmartDirectorOutput"):
        from director_jax.pytorch import smart_pipeline

        return getattr(smart_pipeline, name)
    raise AttributeError(f"module 'director_jax.pytorch' has no attribute {name!r}")
