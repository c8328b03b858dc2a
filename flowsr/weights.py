"""Loading pretrained weights from a hub id or a local directory, with one clear error.

Real runs never fall back to random weights: when a weight cannot be loaded, the user gets a
`MissingWeightsError` that names what to provide and how.
"""
from __future__ import annotations

import os


class MissingWeightsError(RuntimeError):
    """A pretrained weight could not be found or loaded."""


def missing(what: str, source: str, hint: str, cause: BaseException | None = None) -> MissingWeightsError:
    where = "local path" if os.path.exists(source) else "hub id / path"
    reason = f" ({type(cause).__name__}: {str(cause).splitlines()[0][:200]})" if cause else ""
    return MissingWeightsError(f"cannot load {what} from {where} {source!r}{reason}. {hint}")


def hub_hint(repo_id: str, config_key: str) -> str:
    return (f"This machine may have no hub access: on one that has, run `huggingface-cli download "
            f"{repo_id} --local-dir DIR`, copy DIR here and pass it as {config_key}=DIR.")
