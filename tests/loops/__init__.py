"""The training loops' tests: the Lightning callback, Fabric, the Hugging Face Trainer, the protocol, reliability."""
