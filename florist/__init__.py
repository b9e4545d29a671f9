"""florist: federated LoRA fine-tuning with FLoRIST and its baselines."""

__version__ = "0.1.0"
