"""Fine-tuning: training data (SFT and RAFT-style), LoRA training, embedding fine-tuning, merging.

Run ``python -m finetune --help`` for the commands; docs/finetune.md walks through the demo.
"""
