"""The one place that knows how the installed transformers passes a KV cache.

transformers renames its cache argument between releases (``past_key_value`` in 4.4x layers,
``past_key_values``, then ``cache`` from 5.2x with the old name deprecated) and calls
``Cache.update`` with a calling convention that changes too. moesim therefore never imitates a cache:
it uses the library's own :class:`transformers.DynamicCache` through its public methods (``update``,
``crop``) and passes it under the name the installed forward declares, so a rename costs neither a
``TypeError`` nor a deprecation warning.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import torch

# Newest spelling first: a forward that still accepts an old name through a deprecation shim declares the
# new one in its signature.
_CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value")


@functools.lru_cache(maxsize=None)
def _declared_parameters(forward: Callable) -> frozenset[str]:
    return frozenset(inspect.signature(forward).parameters)


def cache_argument(module: torch.nn.Module) -> str:
    """The keyword under which ``module``'s forward takes its KV cache in the installed transformers."""
    declared = _declared_parameters(type(module).forward)
    for name in _CACHE_ARGUMENTS:
        if name in declared:
            return name
    # A forward that takes only **kwargs forwards the cache by the library's current name.
    return _CACHE_ARGUMENTS[0] if _library_uses_cache_keyword() else "past_key_values"


def declares(module: torch.nn.Module, parameter: str) -> bool:
    """Whether ``module``'s forward names ``parameter`` (older releases take ``cache_position``; newer do not)."""
    return parameter in _declared_parameters(type(module).forward)


@functools.lru_cache(maxsize=1)
def _library_uses_cache_keyword() -> bool:
    from transformers.modeling_outputs import BaseModelOutputWithPast

    return "cache" in getattr(BaseModelOutputWithPast, "__dataclass_fields__", {})


def returned_cache(output: Any) -> Any:
    """The cache a model forward returned, under whichever field name the installed release uses."""
    for name in ("cache", "past_key_values"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None


def new_cache():
    """An empty library-owned dynamic KV cache."""
    from transformers import DynamicCache

    return DynamicCache()


def layer_keys_values(cache: Any, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The key and value tensors one layer of a dynamic cache holds."""
    layer = cache.layers[layer_idx]
    return layer.keys, layer.values


class PastContext:
    """A library :class:`DynamicCache` holding ``context`` random past tokens for one attention layer.

    Built from the shapes one real probe step stores (so grouped-query, multi-head latent and other layouts
    work); :meth:`rewind` drops what a timed step appended, so every timed step sees the same past.
    """

    def __init__(self, layer_idx: int, context: int, probe: Callable[[Any], None], seed: int = 0):
        self.layer_idx = layer_idx
        self.context = context
        scratch = new_cache()
        probe(scratch)
        keys, values = layer_keys_values(scratch, layer_idx)
        self.step = int(keys.shape[-2])
        g = torch.Generator(device="cpu").manual_seed(seed)

        def random_like(t: torch.Tensor) -> torch.Tensor:
            shape = (*t.shape[:-2], context, t.shape[-1])
            return torch.randn(shape, generator=g).to(t.device, t.dtype)

        self.cache = new_cache()
        if context > 0:
            self.cache.update(random_like(keys), random_like(values), layer_idx)

    def rewind(self) -> None:
        # Only this layer holds tokens: a whole-cache crop trips over the empty layers below it in some
        # releases. A negative count removes that many newest tokens.
        self.cache.layers[self.layer_idx].crop(-self.step)
