"""The compression tests' quantizer settings, every value stated (the job spec's defaults are not the
math's): GPTQ 4-bit, groups of 16, asymmetric, damp 0.01, columns in order; a test overrides what it varies."""

from worker.compression.specs import QuantSpec


def spec_of(**fields) -> QuantSpec:
    values = {"method": "gptq", "bits": 4, "group_size": 16, "symmetric": False, "damp": 0.01, "act_order": False}
    return QuantSpec(**{**values, **fields})
