"""sweep: Ray-distributed pruning sweeps for convolutional networks."""

__version__ = "0.1.0"
