"""Training engine: optimizers and LR schedules, synchronised BatchNorm, stability guard."""
