"""State that lives across training steps: MoCo's key queue, PIRL's memory bank (checkpointed, DDP-consistent)."""
