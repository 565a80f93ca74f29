"""Tiny shapes gain nothing from intra-op threads, and on a shared 2-core machine OpenMP spinning
under contention makes them 10x slower: run single-threaded."""

import torch

torch.set_num_threads(1)
