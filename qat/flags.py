"""`FlagBuffers`: boolean module state that checkpoints like a buffer and reads like a Python bool."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["FlagBuffers"]


class FlagBuffers(nn.Module):
    """Boolean state kept twice: as buffers (so it checkpoints and loads with the model) and as
    Python bools that the forward pass reads. Reading a CUDA buffer with ``bool()`` synchronizes
    the device, several times per layer per training step; the mirror never does. Read flags with
    :meth:`flag`, write them only through :meth:`_set_flag`; loading a state dict refreshes the
    mirror.

    Example::

        >>> class Switch(FlagBuffers):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self._register_flag("on", False)
        >>> sw = Switch(); sw._set_flag("on", True)
        >>> sw.flag("on"), sw.state_dict()["on"]
        (True, tensor(True))
    """

    def _register_flag(self, name: str, value: bool) -> None:
        if "_flags" not in self.__dict__:
            self._flags: dict[str, bool] = {}
        self.register_buffer(name, torch.tensor(value))
        self._flags[name] = value

    def flag(self, name: str) -> bool:
        """The flag ``name``'s value, read from the Python mirror (no device sync)."""
        return self._flags[name]

    def _set_flag(self, name: str, value: bool) -> None:
        value = bool(value)
        if torch.compiler.is_compiling():
            # written without being read: reading the mirror here would make torch.compile guard on
            # its value, and the flip (an observer's first batch) would recompile the graph at step 2
            getattr(self, name).fill_(value)
            self._flags[name] = value
        elif self._flags[name] != value:
            getattr(self, name).fill_(value)
            self._flags[name] = value

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._flags = {name: bool(getattr(self, name)) for name in self._flags}
