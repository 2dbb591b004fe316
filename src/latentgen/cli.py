"""The `latentgen` command line: one typer command per user task."""

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Latent Diffusion image generation.")


@app.callback()
def main() -> None:
    """latentgen: txt2img, inpaint, upscale and reconstruct with Latent Diffusion Models."""
