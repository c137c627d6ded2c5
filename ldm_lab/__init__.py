"""ldm_lab: latent diffusion models from scratch on one consumer GPU."""
