"""Quality of what is sampled: fidelity to the official sampler, class accuracy, Frechet distances."""
