"""gemini's Hydra launchers, where Hydra looks for them.

Hydra instantiates a launcher only from a class defined in the
``hydra_plugins`` namespace package, so the two classes are declared here;
what they do is :class:`gemini.launchers.PerJobShape` over the stock
hydra-submitit-launcher classes.
"""

from __future__ import annotations

from hydra_plugins.hydra_submitit_launcher import submitit_launcher as stock

from gemini.launchers import PerJobShape


class SlurmLauncher(PerJobShape, stock.SlurmLauncher):
    """``hydra/launcher=slurm``: one SLURM job per sweep job, shaped by its config."""


class LocalLauncher(PerJobShape, stock.LocalLauncher):
    """``hydra/launcher=submitit_local``: the same tasks as processes on this machine."""
