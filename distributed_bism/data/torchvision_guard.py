"""Import torchvision even where its compiled extension cannot load (CUDA wheel on CPU-only torch).

The only torchvision 0.28.0 wheel is the CUDA build. Its `_C` extension links against
libc10_cuda.so, so with CPU torch it fails to load; torchvision tolerates that, but its
`_meta_registrations` then registers fake kernels for `torchvision::nms` / `torchvision::qnms`,
operators nobody defined, and `import torchvision` dies with
"operator torchvision::nms does not exist". Defining those two schemas first makes the import
succeed; datasets, transforms, utils.make_grid / save_image and models then work, while the
compiled ops (nms, roi_align, ...) still raise torchvision's own "Couldn't load custom C++ ops".

When to define them: only when the extension is really missing. Checking torch.version.cuda
would be a proxy (a CPU torchvision build loads fine on CPU torch; a mismatched CUDA build may
not load on CUDA torch), so instead this asks the extension itself: it loads
`torchvision/_C` with `torch.ops.load_library`, exactly as torchvision's `extension.py` is about
to, located the same way (FileFinder over EXTENSION_SUFFIXES) but without importing torchvision.
If that load succeeds the real schemas exist and nothing is defined (defining them first would
clash with the extension's own registration); if it raises OSError, the two schemas are defined.
Every process that imports torchvision must call `import_torchvision()` (Ray workers included):
operator registrations are per process.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch

# The schemas torchvision registers fake kernels for unconditionally at import (as in its C++ source).
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
# Module-level so the registrations live as long as the process (a Library deregisters when collected).
_LIBRARY: torch.library.Library | None = None
_LOCK = threading.Lock()


def _op_defined(name: str) -> bool:
    """Whether torchvision::<name> has a schema in this process (hasattr catches the AttributeError)."""
    return hasattr(torch.ops.torchvision, name)


def _extension_path() -> Path | None:
    """torchvision's compiled `_C` library, found without importing torchvision (None: not there)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    directory = next(iter(spec.submodule_search_locations))
    finder = importlib.machinery.FileFinder(
        directory, (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES)
    )
    ext = finder.find_spec("_C")
    return Path(ext.origin) if ext is not None and ext.origin else None


def extension_loads() -> bool:
    """Load torchvision's `_C` as torchvision would; False when it cannot (e.g. missing libc10_cuda.so)."""
    path = _extension_path()
    if path is None:
        return False
    try:
        torch.ops.load_library(str(path))
    except OSError:  # torch wraps every dlopen failure in OSError("Could not load this library: ...")
        return False
    return True


def _define_missing_schemas() -> None:
    global _LIBRARY
    missing = [name for name in _SCHEMAS if not _op_defined(name)]
    if not missing:
        return
    if _LIBRARY is None:
        # FRAGMENT rather than DEF: adds to the namespace whether or not something else created it.
        _LIBRARY = torch.library.Library("torchvision", "FRAGMENT")
    for name in missing:
        _LIBRARY.define(_SCHEMAS[name])


def import_torchvision() -> ModuleType:
    """The torchvision module, importable on CPU torch with the CUDA wheel; idempotent and thread-safe.

    If torchvision is already imported it is returned as is. Otherwise the compiled extension is
    tried first and the nms / qnms schemas are defined only if it does not load.
    """
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    with _LOCK:
        if importlib.util.find_spec("torchvision") is None:
            raise ModuleNotFoundError(
                "torchvision is not installed; install the 'dist' extra "
                "(pip install -c constraints.txt torchvision==0.28.0)"
            )
        if not _op_defined("nms") and not extension_loads():
            _define_missing_schemas()
        return importlib.import_module("torchvision")
