"""``GenerationConfig.compile``: the one-token decode forward through ``torch.compile``.

Only the decode step is compiled: its shapes differ from step to step only in the cache length,
which ``dynamic=True`` keeps symbolic, while prefills of every prompt length would each compile
anew. One compiled callable is kept per model object, so later generators and runs reuse it.
"""
from __future__ import annotations

import shutil
import weakref
from typing import Any, Callable

import torch

from ..errors import ConfigError

_COMPILED: "weakref.WeakKeyDictionary[Any, Callable[..., Any]]" = weakref.WeakKeyDictionary()


def check_compiler(device: torch.device) -> None:
    """Raise a ConfigError saying what is missing when ``torch.compile`` cannot build kernels for
    ``device``: a C++ compiler for CPU code, Triton for CUDA."""
    if device.type == "cpu":
        if not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")):
            raise ConfigError("compile: torch.compile needs a C++ compiler (g++ or clang++) for CPU kernels and "
                              "none is on PATH; install one (e.g. apt-get install g++) or drop --compile")
    elif device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ConfigError("compile: torch.compile needs Triton for CUDA kernels and it is not installed; "
                              "pip install triton (it comes with CUDA builds of torch) or drop --compile")
    else:
        raise ConfigError(f"compile: not supported on {device.type}; drop --compile")


def compiled_forward(model: Any) -> Callable[..., Any]:
    """The model compiled for decode steps (made once per model; called like the model, so its
    module hooks still run)."""
    fn = _COMPILED.get(model)
    if fn is None:
        fn = _COMPILED[model] = torch.compile(model, dynamic=True)
    return fn
