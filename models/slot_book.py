"""Slot bookkeeping of stacked LoRA adapters: which adapter holds which slot (slot 0 is the bare
base), with each adapter's task and classification head. Shared by the torch stacks
(``models.lora_slots``) and the ONNX ones (``models.onnx_backend``); knows no tensors.
"""

from __future__ import annotations

import itertools
import threading

from models.errors import InvalidAdapter


class SlotBook:
    """Which adapter holds which slot (slot 0 is the bare base), with each adapter's task and
    head. Updates hold ``_lock``; readers (forward passes) only do single dict reads."""

    def __init__(self, slots: int):
        self._lock = threading.Lock()
        self._slots = max(slots, 1) + 1  # capacity, + the base slot
        self.slot_of: dict[str, int] = {}
        self._free: list[int] = []
        self.heads: dict = {}
        self.tasks: dict[str, str] = {}
        self.serial: dict[str, int] = {}  # which load of the adapter holds its slot
        self._loads = itertools.count(1)

    def _take_slot(self) -> int:
        """A free slot; the capacity doubles when every slot is taken."""
        if self._free:
            return self._free.pop()
        used = len(self.slot_of) + 1
        if used >= self._slots:
            self._slots *= 2
        return used

    def _check_new(self, name: str) -> None:
        if name in self.tasks:
            raise InvalidAdapter(f"adapter name {name!r} is already loaded here", param="lora_name")

    def _commit(self, name: str, slot: int, task: str, head) -> None:
        if head is not None:  # head first: a row may use the adapter once it has a slot
            self.heads[name] = head
        self.tasks[name] = task
        self.serial[name] = next(self._loads)
        self.slot_of[name] = slot

    def remove(self, name: str) -> None:
        with self._lock:
            slot = self.slot_of.pop(name, None)
            if slot is None:
                return
            self.tasks.pop(name)
            self.serial.pop(name, None)
            self.heads.pop(name, None)
            self._release(slot)
            self._free.append(slot)

    def _release(self, slot: int) -> None:
        """Hook: the slot no longer serves an adapter."""
