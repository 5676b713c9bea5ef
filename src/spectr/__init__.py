"""spectr: exact speculative decoding with several drafts (SpecTr's K-SEQ)."""

__version__ = "0.1.0"
