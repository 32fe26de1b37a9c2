"""Weight files checked before they load: one line naming the path, what was expected and what was found.

A truncated download, a file of another model or a folder missing a part otherwise surfaces deep inside a loader
as an error that names no file (safetensors' ``SafetensorError``, a shape mismatch in ``load_state_dict``).
"""

from __future__ import annotations

from pathlib import Path


class WeightsError(ValueError):
    """A weight file or folder that cannot be used as asked; the message names the path and the remedy."""


def safetensors_shapes(path: str | Path, *, what: str = "weights") -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} from a safetensors header, without reading the tensors; :class:`WeightsError` for a
    missing, truncated or foreign file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: missing ({what} expected there)")
    try:  # safetensors checks that the header's offsets cover the file exactly: a cut file fails here
        with safe_open(str(path), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types, OSError or ValueError
        raise WeightsError(f"{path}: not a readable safetensors file ({path.stat().st_size} bytes; "
                           f"{type(err).__name__}: {err}); download, copy or train the {what} again") from None
