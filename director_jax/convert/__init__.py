"""Weight conversion: official Wan2.1 / diffusers checkpoints <-> this project's Flax modules.

``python -m director_jax.convert import|export --model vae|dit|sr ...`` is the command line
(``convert.command.convert_weights`` as a function).
"""

from director_jax.convert.dit import export_transformer, load_transformer
from director_jax.convert.state_dict import WeightMismatchError
from director_jax.convert.vae import VAECheckpoint, export_vae, load_vae, read_vae_checkpoint

__all__ = [
    "VAECheckpoint",
    "WeightMismatchError",
    "export_transformer",
    "export_vae",
    "load_transformer",
    "load_vae",
    "read_vae_checkpoint",
]
