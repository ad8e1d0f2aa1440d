"""The life of one served (base, variant): open it, gate it, watch its files, swap it.

``VariantLifecycle`` owns the ``Backend`` that serves a variant and the state ``/v1/models``
shows for it (``info``). Policy:

- ``open()``: a torch failure raises (the replica cannot serve); an ONNX variant that fails to
  open or fails the parity gate (``models.variants.parity``) is recorded as ``failed`` with its
  reason and never takes the replica down: its requests get ``VariantUnavailable``.
- ``watch()`` polls the variant's files (``Backend.watched_files``); when they change and then
  hold still for a moment, ``reload()`` opens and gates the new files beside the serving backend
  (off the event loop), re-adds every resident adapter after re-validating it from disk, and
  only then hands the new backend to ``on_swap`` (the server swaps it in between two batches).
  A rejected replacement leaves the serving backend as it was; a missing file never triggers a
  reload (a serving replica never rebuilds variants).

Ray-free and HTTP-free: the server injects the backend factory, the resident adapters and the
re-validation of one adapter.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

from models.adapters.identity import AdapterRef
from models.adapters.validation import AdapterCheck
from models.backend import Backend
from models.errors import AdapterLoadFailed, VariantUnavailable
from models.spec import ONNX_VARIANTS, ModelSpec
from models.variants.cache import reference_for
from models.variants.parity import check_variant

log = logging.getLogger("loraserve")
SETTLE_S = 0.5  # a replaced file must hold still this long before it is tried


def files_signature(paths: list[Path]) -> tuple:
    """Size, mtime and inode of each file (None when missing): a change means a replacement."""
    out = []
    for p in paths:
        try:
            st = Path(p).stat()
            out.append((st.st_size, st.st_mtime_ns, st.st_ino))
        except OSError:
            out.append(None)
    return tuple(out)


class VariantLifecycle:
    def __init__(
        self,
        spec: ModelSpec,
        variant: str,
        factory: Callable[[ModelSpec, str], Backend],
        *,
        on_swap: Callable[[Backend], None] = lambda backend: None,
        on_reload: Callable[[str], None] = lambda result: None,
        resident: Callable[[], dict[str, tuple[AdapterRef, tuple]]],
        revalidate: Callable[[AdapterRef], AdapterCheck],
    ):
        self.spec = spec
        self.variant = variant
        self._factory = factory
        self._on_swap = on_swap
        self._on_reload = on_reload
        self._resident = resident
        self._revalidate = revalidate
        self.backend: Backend | None = None
        self.info: dict = {"status": "loading"}
        self._paths: list[Path] = []  # the files last opened or tried
        self._signature: tuple | None = None

    @property
    def gated(self) -> bool:
        return self.variant in ONNX_VARIANTS

    def open(self) -> Backend | None:
        """Create, load and gate the backend; returns it, or None for a failed ONNX variant."""
        backend = None
        try:
            backend = self._factory(self.spec, self.variant)
            self._paths = backend.watched_files()
            self._signature = self.signature()
            parity = self._load_and_gate(backend)
        except Exception as exc:
            if not self.gated:
                raise
            self._fail(exc)
            close_quietly(backend)
            return None
        self.backend = backend
        self.info = self._serving_info(backend, parity)
        return backend

    def _load_and_gate(self, backend: Backend) -> dict | None:
        """Load ``backend``; for an ONNX variant, run the parity gate. Returns the parity
        result; raises ``VariantUnavailable`` (carrying it) when the variant must not serve."""
        backend.load()
        if not self.gated:
            return None
        parity = check_variant(backend, *reference_for(self.spec, backend))
        if not parity["passed"]:
            raise VariantUnavailable(f"{self.spec.id}@{self.variant} is not served: {parity['reason']}",
                                     parity=parity)
        return parity

    def _serving_info(self, backend: Backend, parity: dict | None) -> dict:
        info = {"status": "serving", "parity": parity or {"reference": True}}
        files = backend.file_digests()
        if files:
            info["files"] = {name: sha[:16] for name, sha in files.items()}
        info["loaded_at"] = int(time.time())
        return info

    def _fail(self, exc: Exception) -> None:
        message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        self.info = {"status": "failed", "reason": message, "parity": getattr(exc, "parity", None),
                     "failed_at": int(time.time()),
                     **({"last_reload": self.info["last_reload"]} if "last_reload" in self.info else {})}
        log.error("%s@%s does not serve: %s", self.spec.id, self.variant, message)

    @property
    def failed(self) -> bool:
        return self.info.get("status") == "failed" and self.backend is None

    def signature(self) -> tuple | None:
        """Stat the files last opened (or tried). None when there are none to watch: the
        variant could not even be built, and polling must not rebuild it every few seconds."""
        return files_signature(self._paths) if self._paths else None

    async def watch(self) -> None:
        """Poll the files every ``onnx.reload_poll_s``; runs until cancelled."""
        poll = self.spec.onnx.reload_poll_s
        while True:
            await asyncio.sleep(poll)
            try:
                sig = self.signature()
                # unchanged, or a file missing (being replaced, or the cache was cleaned)
                if sig is None or sig == self._signature or None in sig:
                    continue
                await asyncio.sleep(min(poll, SETTLE_S))  # a copy in progress: let it settle
                if self.signature() != sig:
                    continue
                await self.reload()
            except asyncio.CancelledError:
                raise
            except Exception:  # the watcher must outlive any one bad replacement
                log.exception("variant watcher of %s@%s", self.spec.id, self.variant)

    async def reload(self) -> dict:
        """Open the variant's current files beside the serving backend; hand them to
        ``on_swap`` if they pass parity, with every resident adapter re-added first."""
        loop = asyncio.get_running_loop()
        self._signature = self.signature()  # tried once per change, pass or fail
        new = None
        try:
            new = await loop.run_in_executor(None, self._factory, self.spec, self.variant)
            self._paths = new.watched_files() or self._paths
            parity = await loop.run_in_executor(None, self._load_and_gate, new)
            while True:  # adapters loaded meanwhile are added too, then the swap is atomic
                missing = {k: r for k, (r, _) in self._resident().items() if k not in new.loaded_adapters()}
                if not missing:
                    break
                for key, ref in missing.items():
                    # re-read from disk: the same checks and content as when it was loaded
                    check = await loop.run_in_executor(None, self._revalidate, ref)
                    if check.sha256 != ref.sha256:
                        raise AdapterLoadFailed(
                            f"resident adapter {ref.name!r} changed on disk since it was loaded; "
                            "unload or re-register it, then replace the variant files again")
                    await loop.run_in_executor(None, new.add_adapter, key, check, ref.task, ref.labels)
        except Exception as exc:
            close_quietly(new)
            message = getattr(exc, "message", None) or str(exc)
            self.info = {**self.info, "last_reload": {"result": "rejected", "reason": message,
                                                      "at": int(time.time())}}
            if self.backend is None:
                self._fail(exc)
            self._on_reload("rejected")
            log.error("replacement files of %s@%s rejected, the serving ones stay: %s",
                      self.spec.id, self.variant, message)
            return dict(self.info)
        for key in set(new.loaded_adapters()) - set(self._resident()):
            new.remove_adapter(key)  # unloaded while the new backend was being prepared
        self.backend = new
        self._on_swap(new)
        self.info = {**self._serving_info(new, parity),
                     "last_reload": {"result": "replaced", "at": int(time.time())}}
        self._on_reload("replaced")
        log.info("%s@%s now serves its replaced files (parity passed)", self.spec.id, self.variant)
        return dict(self.info)

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()


def close_quietly(backend: Backend | None) -> None:
    """Free a backend that will not serve (its sessions can be large)."""
    if backend is not None:
        try:
            backend.close()
        except Exception:  # a half-loaded backend may fail to close; it is dropped anyway
            pass
