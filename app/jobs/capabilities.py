"""What the worker can run today. Anything else is refused at submit with 'not supported yet'."""

from __future__ import annotations

from app.errors import NotSupportedYet
from app.jobs.destinations import scheme_of
from app.jobs.spec import JobSpec

QUANTIZATION_METHODS = {"rtn", "gptq"}
SPARSITY_METHODS = {"magnitude", "wanda", "sparsegpt"}
COMPENSATION_METHODS = {"none", "eora", "svd"}
DESTINATION_SCHEMES = {"local", "s3", "hf", "hub"}


def check_supported(spec: JobSpec) -> None:
    if spec.quantization is not None and spec.quantization.method not in QUANTIZATION_METHODS:
        raise NotSupportedYet("quantization.method", f"'{spec.quantization.method}' is not supported yet "
                              f"(supported: {', '.join(sorted(QUANTIZATION_METHODS))})")
    if spec.sparsity is not None and spec.sparsity.method not in SPARSITY_METHODS:
        raise NotSupportedYet("sparsity.method", f"'{spec.sparsity.method}' is not supported yet "
                              f"(supported: {', '.join(sorted(SPARSITY_METHODS)) or 'none'})")
    if spec.compensation is not None and spec.compensation.method not in COMPENSATION_METHODS:
        raise NotSupportedYet("compensation.method", f"'{spec.compensation.method}' is not supported yet "
                              f"(supported: {', '.join(sorted(COMPENSATION_METHODS))})")
    scheme = scheme_of(spec.destination.uri)
    if scheme not in DESTINATION_SCHEMES:
        raise NotSupportedYet("destination.uri", f"'{scheme}://' destinations are not supported yet "
                              f"(supported: {', '.join(sorted(DESTINATION_SCHEMES))})")
