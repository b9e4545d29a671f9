"""florist: federated LoRA fine-tuning with FLoRIST and its baselines."""

from .threads import set_wait_policy

set_wait_policy()  # before torch loads OpenMP: idle threads sleep rather than spin (florist.threads says why)

__version__ = "0.1.0"
