"""modelyard: run many vision-language models over large image sets.

Each model runs in its own Ray actor with its own inference engine; unloading kills the actor
and the driver verifies through NVML that the GPU memory came back.
"""

__version__ = "0.1.0"

from .api import pipeline  # noqa: E402  (imports neither Ray nor torch until used)

__all__ = ["pipeline", "__version__"]
