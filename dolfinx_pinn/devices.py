"""The torch device of a run: one helper for every solver.

``"cuda"`` on a communicator means GPU ``rank mod n_gpus``, so that ``mpirun -n N`` on a machine
with several GPUs spreads the ranks over them; ``"auto"`` picks CUDA when torch sees a GPU.
"""

from __future__ import annotations

from mpi4py import MPI

import torch

__all__ = ["select_device"]


def select_device(
    device: str | torch.device = "auto", comm: MPI.Comm | None = None
) -> torch.device:
    """The torch device for ``device`` on this rank.

    Args:
        device: ``"auto"`` (CUDA when available, else the CPU), ``"cpu"``, ``"cuda"``,
            ``"cuda:k"`` or a ``torch.device``.
        comm: With a communicator, ``"cuda"`` and ``"auto"`` choose GPU ``rank mod n_gpus``.

    Raises:
        ValueError: naming ``device`` when it is unknown or CUDA is asked for without a GPU.
    """
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise ValueError(f"device must be a string or a torch.device, got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} requested but torch sees no CUDA device")
        if device == "cuda" and comm is not None:
            return torch.device("cuda", comm.rank % torch.cuda.device_count())
        return torch.device(device)
    raise ValueError(
        f"device must be 'auto', 'cpu', 'cuda', 'cuda:k' or a torch.device, got {device!r}"
    )
