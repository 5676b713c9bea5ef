"""spectr: exact speculative decoding with several drafts (SpecTr's K-SEQ).

    import spectr
    engine = spectr.load()
    print(spectr.generate(engine, "Tell me a joke.", chat=True, seed=0).text)
"""

__version__ = "0.1.0"

_API = ("Engine", "GenerationResult", "GenerationStats", "generate", "load", "stream")
__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    # The API pulls in transformers; `spectr.rules` alone should not pay for that import.
    if name in _API:
        from spectr import api

        return getattr(api, name)
    raise AttributeError(f"module 'spectr' has no attribute '{name}'")
