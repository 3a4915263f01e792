"""Launchers: Slurm sbatch generation (``launch.slurm``), local torchrun (``launch.local``), hostlists.

Both run the same entry, ``python -m r1mega.cli <command> --config <recipe> <overrides>``, under
``torchrun``; only how the processes are spread over machines differs. Nothing here imports torch or
megatron, so scripts are generated (and recipes validated) on a login node.
"""

from launch.nodelist import expand_nodelist, first_host

__all__ = ["expand_nodelist", "first_host"]
