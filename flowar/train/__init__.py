"""Training as usual: the FlowAR trainer (official multi-scale flow loss), the small VAE, data."""
