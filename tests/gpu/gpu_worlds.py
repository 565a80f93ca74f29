"""World-size selection shared by the GPU test modules."""

import os


def selected(world: int) -> bool:
    """RAYTRON_GPU_WORLDS="4" (comma-separated) limits a run to those world sizes (device time is scarce)."""
    chosen = os.environ.get("RAYTRON_GPU_WORLDS", "")
    return not chosen or str(world) in chosen.split(",")
