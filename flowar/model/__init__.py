"""The reference modules: layers, the AR transformer, the flow head, the VAE, checkpoint I/O."""
