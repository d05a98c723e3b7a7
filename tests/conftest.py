"""Shared fixtures. The tiny-model fixtures live in tests/fixtures_models.py."""

from tests.fixtures_models import (  # noqa: F401  (pytest discovers fixtures by name)
    calibration_windows,
    tiny_llama,
    tiny_model_dir,
    tiny_tokenizer,
    torch_threads,
)
