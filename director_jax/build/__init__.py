"""Config -> models, and trained weights -> models: the one place every command builds its models from.

``models``: config -> VAE / Director-Gen / Director-SR / frozen VAE. ``checkpoints``: what a trainer
checkpoint is (flat array names, committed steps, damage). ``loading``: trainer checkpoints -> models
for inference, onto their sharding, falling back past damaged steps.
"""
from director_jax.build.checkpoints import (
    CHECKED_SECTIONS,
    COMMIT_FILE,
    STATE_ITEM,
    TMP_STEP,
    WEIGHTS,
    DamagedCheckpointError,
    LoadedCheckpoint,
    candidate_steps,
    check_config_matches,
    config_disagreements,
    describe_mismatch,
    first_nonfinite,
    flatten_state,
    is_committed_step,
    path_parts,
    quiet_failed_restore,
    quiet_orbax_reads,
    saved_config,
    scan_steps,
    short_reason,
    step_directory,
    unflatten_state,
)
from director_jax.build.loading import (
    load_director_gen,
    load_director_sr,
)
from director_jax.build.models import (
    build_director_gen,
    build_director_sr,
    build_vae,
    dit_config,
    frozen_vae,
    load_frozen_vae,
    model_options,
    random_frozen_vae,
    vae_config_from,
    vae_config_with_checkpoint_stats,
)

__all__ = [
    "CHECKED_SECTIONS", "COMMIT_FILE", "DamagedCheckpointError", "LoadedCheckpoint", "STATE_ITEM", "TMP_STEP",
    "WEIGHTS", "build_director_gen", "build_director_sr", "build_vae", "candidate_steps",
    "check_config_matches", "config_disagreements", "describe_mismatch", "dit_config", "first_nonfinite",
    "flatten_state", "frozen_vae", "is_committed_step", "load_director_gen", "load_director_sr",
    "load_frozen_vae", "model_options", "path_parts", "quiet_failed_restore", "quiet_orbax_reads",
    "random_frozen_vae", "saved_config", "scan_steps", "short_reason", "step_directory", "unflatten_state",
    "vae_config_from", "vae_config_with_checkpoint_stats",
]
