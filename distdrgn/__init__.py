"""distdrgn: heterogeneous cryo-EM reconstruction at scale."""
__version__ = "0.1.0"
