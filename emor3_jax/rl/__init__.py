"""GRPO pieces: advantages, losses, log-probs, the update step."""
