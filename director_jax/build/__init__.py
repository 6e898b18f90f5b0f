"""Config -> models, and trained weights -> models: the one place every command builds its models from.

``models``: config -> VAE / Director-Gen / Director-SR / frozen VAE. ``checkpoints``: what a trainer
checkpoint is (flat array names, committed steps, damage). ``steps``: reading a step's arrays, the
newest readable step. ``loading``: trainer checkpoints -> models for inference, onto their sharding,
falling back past damaged steps. ``reuse``: a training run as a frozen VAE, as the start of another
run, or as the source of an export. ``sections``: config sections -> model configs.
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
    RANDOM_VAE,
    build_director_gen,
    build_director_sr,
    build_vae,
    frozen_vae,
    load_frozen_vae,
    random_frozen_vae,
    vae_config_with_checkpoint_stats,
)
from director_jax.build.reuse import (
    EXPORT_TASKS,
    LATENT_STATS,
    LATENT_STATS_KEYS,
    TrainedVAE,
    export_run,
    is_trainer_run,
    latent_mean_std,
    read_run_for_export,
    read_trainer_dit,
    read_trainer_vae,
)
from director_jax.build.sections import dit_config, model_options, vae_config_from

__all__ = [
    "CHECKED_SECTIONS", "COMMIT_FILE", "DamagedCheckpointError", "EXPORT_TASKS", "LATENT_STATS", "LATENT_STATS_KEYS",
    "LoadedCheckpoint", "RANDOM_VAE", "STATE_ITEM", "TMP_STEP", "TrainedVAE", "WEIGHTS", "build_director_gen",
    "build_director_sr", "build_vae", "candidate_steps", "check_config_matches", "config_disagreements",
    "describe_mismatch", "dit_config", "export_run", "first_nonfinite", "flatten_state", "frozen_vae",
    "is_committed_step", "is_trainer_run", "latent_mean_std", "load_director_gen", "load_director_sr",
    "load_frozen_vae", "model_options", "path_parts", "quiet_failed_restore", "quiet_orbax_reads",
    "random_frozen_vae", "read_run_for_export", "read_trainer_dit", "read_trainer_vae", "saved_config", "scan_steps",
    "short_reason", "step_directory", "unflatten_state", "vae_config_from", "vae_config_with_checkpoint_stats",
]
