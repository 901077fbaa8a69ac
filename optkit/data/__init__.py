"""Token batches for the measured training step: synthetic, learnable, packed."""
