"""Training: the Trainer with what IMSM needs on top, and writing run folders and checkpoints."""
