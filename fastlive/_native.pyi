# The compiled cffi module (API mode): ``ffi`` and ``lib``, whose functions
# and constants are declared in csrc/fl_*.h.
from typing import Any

ffi: Any
lib: Any
