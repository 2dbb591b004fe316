"""latentgen: Latent Diffusion Models (Rombach et al., CVPR 2022) from the command line and Python.

The CLI is a thin layer over this API:

    import latentgen
    model = latentgen.prepare(latentgen.load_model("txt2img-emoji"))        # bundled name or a path
    images = latentgen.txt2img(model, ["a red heart"], options=latentgen.Sampling(steps=30, scale=7.5))
    latentgen.save_image(images[0], "heart.png")                         # images: [N, 3, H, W] in [-1, 1]
"""

__version__ = "0.1.0"

from .addons import add_loras, load_embeddings, merge_lora, set_clip_skip, swap_vae  # noqa: E402
from .errors import LatentgenError  # noqa: E402
from .images import grid, load_image, load_mask, save_image  # noqa: E402
from .jobs import Job, from_parameters, parameters_text, plan_jobs, read_prompts, run_txt2img  # noqa: E402
from .ldm import LatentDiffusion, ModelSpec  # noqa: E402
from .loader import list_models, load_model  # noqa: E402
from .previews import preview_writer  # noqa: E402
from .tasks import Hires, Reconstruction, Sampling, img2img, inpaint, prepare, reconstruct, txt2img, upscale  # noqa: E402
from .tiling import set_seamless  # noqa: E402

__all__ = [
    "add_loras", "load_embeddings", "merge_lora", "set_clip_skip", "swap_vae", "Hires", "Job", "LatentDiffusion", "LatentgenError", "ModelSpec", "Reconstruction", "Sampling", "from_parameters", "grid",
    "img2img", "inpaint", "list_models", "load_image", "load_mask", "load_model", "parameters_text", "plan_jobs", "prepare",
    "preview_writer", "read_prompts", "reconstruct", "run_txt2img", "save_image", "set_seamless", "txt2img",
    "upscale",
]
