"""FlowSR: one-step image super-resolution via consistency rectified flow.

The method lives here as pure torch (+ diffusers / peft for the SD backbone); Ray appears
only in `pipeline/` and `jobs/`.
"""

__version__ = "0.1.0"
