"""EMO-R3 rewards: rule-based scores and the reflective judge."""
