"""Exit statuses of the `raytron` commands (the same meaning for every subcommand)."""

EXIT_FAILED = 1
"""The job ran and failed (failure budget spent, or stopped by a numerics policy)."""
EXIT_INVALID = 2
"""Refused before anything started: a bad config, path, checkpoint or flag; nothing was written."""
EXIT_PREEMPTED = 3
"""The job was preempted past its budget, or the driver was told to stop; it can be resumed."""
EXIT_ABORTED = 130
"""A second Ctrl-C: the shell's convention for SIGINT."""
