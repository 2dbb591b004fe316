"""latentgen: Latent Diffusion Models (Rombach et al., CVPR 2022) from the command line and Python."""

from .errors import LatentgenError

__all__ = ["LatentgenError"]
__version__ = "0.1.0"
