"""The PyTorch side: Director's transformers on diffusers' modules (``modules``) and the Director-Gen
pipeline from exported weights (``pipeline``); ``python -m director_jax.pytorch`` runs that pipeline."""
