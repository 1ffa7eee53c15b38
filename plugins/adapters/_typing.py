"""The type the adapters give a library's model where they read it by attribute.

torch's stubs type every attribute of an ``nn.Module`` as ``Tensor | Module``
(``nn.Module.__getattr__``): right for registered parameters, buffers and submodules, wrong for
the plain attributes the adapters read (``num_heads``, ``window_size``, ``patch_embed.img_size``,
a transformers ``config``) and for the library's own submodule classes (a ``ModuleList`` of
blocks, each with its ``attn``). Such a model is :data:`LibraryModule` to mypy; code that hands a
module on (hooks, taps) keeps ``nn.Module``.
"""

from __future__ import annotations

from typing import Any, TypeAlias

__all__ = ["LibraryModule"]

#: a transformers, timm or open_clip model (or a part of one) read by its attributes
LibraryModule: TypeAlias = Any
