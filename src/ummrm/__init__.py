"""ummrm: reward models that resist reward hacking, by upcycling a dense reward model into a mixture
of experts and merging the experts back into one dense model (UMM-RM)."""

__version__ = "0.1.0"
