"""Resolving a model reference (local folder or Hugging Face Hub id) to a local folder.

Hub downloads pin the revision: a branch or tag is resolved to its commit SHA first, the SHA is
what gets downloaded and recorded. Only safetensors weights (and config/tokenizer files) are fetched.
A caller's `check_config` sees the folder holding the model's config.json before any weight is
downloaded (a Hub model's config.json is fetched alone first), so a job that cannot fit is refused
without downloading gigabytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from app.jobs.service import looks_local
from app.settings import Settings
from worker.errors import JobFailure
from worker.models import PICKLE_SUFFIXES

WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
SIDE_PATTERNS = ["*.json", "tokenizer*", "*.model", "*.txt", "*.tiktoken"]


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    source: str  # "local" or "hub"
    revision: str  # the commit SHA for Hub models, "local" for folders


def resolve_model(ref: str, revision: str, settings: Settings, token: str | None = None,
                  check_config: Callable[[Path], None] | None = None) -> ResolvedModel:
    """check_config: called with the folder holding config.json before any weight is downloaded; it
    refuses by raising (JobFailure)."""
    if looks_local(ref):
        path = Path(ref.removeprefix("file://")).expanduser().resolve()
        if not settings.local_path_permitted(path):
            raise JobFailure(f"model {ref!r}: local paths are not allowed on this server")
        if not path.is_dir():
            raise JobFailure(f"model {ref!r} not found: no such local folder")
        if check_config is not None:
            check_config(path)
        return ResolvedModel(path=path, source="local", revision="local")
    return _download(ref, revision, settings, token, check_config)


def _download(repo_id: str, revision: str, settings: Settings, token: str | None,
              check_config: Callable[[Path], None] | None) -> ResolvedModel:
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    token = token or (settings.hf_token.get_secret_value() if settings.hf_token else None)
    endpoint = settings.hf_endpoint  # a mirror, as the API's routing reads config.json from; None: HF_ENDPOINT
    api = HfApi(token=token, endpoint=endpoint)
    try:
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
    except RepositoryNotFoundError:
        raise JobFailure(f"model {repo_id!r} not found on the Hugging Face Hub "
                         "(or it is private and no token was given)") from None
    except RevisionNotFoundError:
        raise JobFailure(f"model {repo_id!r} has no revision {revision!r}") from None
    except GatedRepoError:
        raise JobFailure(f"model {repo_id!r} is gated: accept its license and pass a token with access") from None
    except Exception as exc:
        raise JobFailure(f"could not reach the Hugging Face Hub for model {repo_id!r}: {exc.__class__.__name__}: {exc}") from None
    files = {s.rfilename: (s.size or 0) for s in (info.siblings or [])}
    weights = {name: size for name, size in files.items() if name.endswith(".safetensors")}
    if not weights:
        pickles = [n for n in files if n.endswith(PICKLE_SUFFIXES)]
        hint = f" (it has only pickle weights: {', '.join(sorted(pickles)[:5])})" if pickles else ""
        raise JobFailure(f"model {repo_id!r} has no safetensors weights{hint}; Squeeze loads safetensors only")
    total = sum(weights.values())
    if total > settings.max_model_bytes:
        raise JobFailure(f"model {repo_id!r} weighs {total / 1e9:.1f} GB, above this server's limit of "
                         f"{settings.max_model_bytes / 1e9:.1f} GB")
    if check_config is not None and "config.json" in files:  # the same snapshot folder the download fills
        config = hf_hub_download(repo_id, "config.json", revision=info.sha, token=token,
                                 cache_dir=settings.data_dir / "hub", endpoint=endpoint)
        check_config(Path(config).parent)
    path = snapshot_download(repo_id, revision=info.sha, token=token, allow_patterns=WEIGHT_PATTERNS + SIDE_PATTERNS,
                             cache_dir=settings.data_dir / "hub", endpoint=endpoint)
    return ResolvedModel(path=Path(path), source="hub", revision=info.sha)
