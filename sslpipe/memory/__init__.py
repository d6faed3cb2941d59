"""State that lives across training steps: MoCo's key queue, PIRL's memory bank (checkpointed, DDP-consistent)."""

from sslpipe.memory.bank import MemoryBank
from sslpipe.memory.queue import MomentumQueue

__all__ = ["MomentumQueue", "MemoryBank"]
