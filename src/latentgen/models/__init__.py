"""The networks, in the official checkpoints' module and parameter names; and how a network is
built to hold tensors read from a file, without a random initialisation that is thrown away."""

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

_INITS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
          "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_")


@contextmanager
def _skipped_init() -> Iterator[None]:
    """torch.nn.init's fills as no-ops. On the meta device they cost most: torch runs them through
    its reference ops, whose first use imports torch._dynamo (1.6 s of a cold CLI on 2 cores)."""
    saved = {name: getattr(nn.init, name) for name in _INITS}
    for name in _INITS:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fill in saved.items():
            setattr(nn.init, name, fill)


def on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """`factory()` on the meta device, uninitialised: its structure, key names and shapes only."""
    with torch.device("meta"), _skipped_init():
        return factory()


def adopt(factory: Callable[[], nn.Module], state: dict, empty: nn.Module = None) -> nn.Module:
    """`factory()` holding exactly the tensors of `state` (no copy, no random init): built on the meta
    device (or `empty`, such a build already made), then given the tensors; built for real only if it
    keeps buffers outside its state dict."""
    module = on_meta(factory) if empty is None else empty
    module.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in [*module.parameters(), *module.buffers()]):
        device = next(iter(state.values())).device if state else torch.device("cpu")
        with torch.device(device):
            module = factory()
        module.load_state_dict(state, strict=True)
    return module.eval()
