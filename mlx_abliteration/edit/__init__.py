"""The orthogonalization math, strength schedules and in-memory apply/revert of ablation plans."""
