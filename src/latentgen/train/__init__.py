"""The paper's two stages: train a perceptual autoencoder, then a diffusion model in its frozen latent space.

`data` prepares the photo and emoji sets, `losses` holds the objectives, `autoencoder` and `ldm`
are the two training loops, `cli` the `latentgen train ...` commands. Training uses the very
classes inference loads (`latentgen.models`), and exports checkpoints in the official CompVis layout.
"""
