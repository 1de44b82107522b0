"""Config files (ml_collections); installed as emor3_jax.configs."""
