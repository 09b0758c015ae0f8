"""fxfuse: fuse sibling linears (q/k/v, gate/up, ...) into one GEMM.

The one public call is `fuse_linears(gm, config)`; `backend` (the
``torch.compile(backend="fxfuse")`` compiler) wraps it. Importing fxfuse has
no side effects: the backend is found through the ``torch_dynamo_backends``
entry point, and nothing is registered or configured at import.
"""

from .backend import Backend, OptionError, backend
from .config import FuseConfig
from .export import fuse_exported
from .fuse import fuse_linears
from .guards import QuantizedWeightChanged, guard_filter
from .inductor import FxfusePass, inductor_pass, installed
from .legality import Reason
from .match import Group
from .report import FusedGroup, FuseReport
from .weights import unfuse

__all__ = [
    "Backend",
    "FxfusePass",
    "inductor_pass",
    "installed",
    "FuseConfig",
    "FuseReport",
    "FusedGroup",
    "Group",
    "OptionError",
    "QuantizedWeightChanged",
    "Reason",
    "backend",
    "fuse_exported",
    "fuse_linears",
    "guard_filter",
    "unfuse",
]
__version__ = "0.1.0"
