"""A job's data: its datasets found (a Hub id, an upload, or a local path the server permits) and read,
then cut into calibration and evaluation windows (load_windows; without an evaluation dataset the
calibration text's last tenth is held back for evaluation), and the job's references as an artifact may
show them, without the server's paths (public_ref, public_spec). The window protocols themselves live in
worker.data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from app.errors import InvalidSpec
from app.jobs.destinations import scheme_of
from app.jobs.service import UPLOAD_PREFIX, looks_local, resolve_upload
from app.jobs.spec import JobSpec
from app.settings import Settings
from worker.errors import JobFailure

HELD_OUT_FRACTION = 0.1  # of calibration documents (or tokens, when they are few), without an evaluation dataset


def _dataset_source(settings: Settings, ref: str, field: str) -> tuple[str, bool]:
    """(what load_texts reads, whether it is a local file or folder). A Hub id is never looked up on disk."""
    if ref.startswith(UPLOAD_PREFIX):
        try:
            return str(resolve_upload(settings, ref)), True
        except InvalidSpec as exc:
            raise JobFailure(str(exc)) from None
    if not looks_local(ref):
        return ref, False
    path = Path(ref.removeprefix("file://")).expanduser()
    if not settings.local_path_permitted(path):
        raise JobFailure(f"{field} {ref!r}: local paths are not allowed on this server")
    return str(path), True


def _load(settings: Settings, ref: str, field: str, split: str, text_field: str, token: str | None) -> list[str]:
    from worker.data import load_texts

    source, local = _dataset_source(settings, ref, field)
    return load_texts(source, split=split, text_field=text_field, allow_local=local, token=token)


def public_ref(ref: str | None) -> str | None:
    """A reference as an artifact may show it: a local path of the server becomes just "local"."""
    return "local" if ref is not None and looks_local(ref) else ref


def public_spec(spec: JobSpec) -> dict[str, Any]:
    """The job spec for the manifest, without the server's paths (models and artifacts get shared) or
    the webhook URL (it may carry the receiver's own token)."""
    data = spec.model_dump(mode="json", exclude={"webhook_url"})
    data["model"]["id"] = public_ref(data["model"]["id"])
    for section in ("calibration", "evaluation"):
        data[section]["dataset"] = public_ref(data[section]["dataset"])
    if scheme_of(data["destination"]["uri"]) == "local" and data["destination"]["uri"] is not None:
        data["destination"]["uri"] = "local"
    return data


def load_windows(spec: JobSpec, settings: Settings, tokenizer,
                 token: str | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(calibration windows, evaluation windows, a description of both).

    Without evaluation.dataset the calibration text's last tenth is held back for evaluation: its last
    tenth of documents when it has ten or more and they hold a whole evaluation window, else the last
    tenth of its tokens (one document, or a few KB). The held-back slice gives what it has, up to
    num_windows windows, or one shorter window when it holds less than one; info["notes"] says so
    whenever evaluation runs on fewer or shorter windows than asked.
    """
    from worker.data import (
        DataError,
        contiguous_windows,
        make_windows,
        stream_windows,
        token_stream,
        windows_hash,
    )

    cal, ev = spec.calibration, spec.evaluation
    eval_len = ev.seq_len or cal.seq_len
    notes: list[str] = []
    try:
        texts = _load(settings, cal.dataset, "calibration.dataset", cal.split, cal.text_field, token)
        if ev.dataset is not None:
            eval_texts = _load(settings, ev.dataset, "evaluation.dataset", ev.split, ev.text_field, token)
            calibration = make_windows(tokenizer, texts, cal.num_samples, cal.seq_len, cal.seed)
            evaluation, eval_source = contiguous_windows(tokenizer, eval_texts, ev.num_windows, eval_len), public_ref(ev.dataset)
        else:
            held_docs = int(len(texts) * HELD_OUT_FRACTION)
            held_stream = token_stream(tokenizer, texts[-held_docs:]) if held_docs else None
            if held_stream is not None and len(held_stream) >= eval_len:
                calibration = make_windows(tokenizer, texts[:-held_docs], cal.num_samples, cal.seq_len, cal.seed)
                eval_source = f"last {held_docs} of {len(texts)} documents of the calibration dataset"
            else:
                stream = token_stream(tokenizer, texts)
                held_tokens = int(len(stream) * HELD_OUT_FRACTION)
                if held_tokens < 2:
                    raise JobFailure(f"calibration.dataset has {len(stream)} tokens, too few to hold back an "
                                     "evaluation slice: give evaluation.dataset or more text")
                held_stream = stream[len(stream) - held_tokens:]
                calibration = stream_windows(stream[: len(stream) - held_tokens], cal.num_samples, cal.seq_len,
                                             cal.seed)
                eval_source = (f"last {held_tokens} of {len(stream)} tokens of the calibration dataset "
                               f"({len(texts)} document{'s' if len(texts) != 1 else ''}: too few to hold back "
                               "a tenth of the documents)")
            evaluation = _held_back_windows(held_stream, ev.num_windows, eval_len, notes)
    except DataError as exc:
        raise JobFailure(f"data: {exc}") from None
    info = {"calibration_windows": list(calibration.shape), "calibration_hash": windows_hash(calibration),
            "evaluation_windows": list(evaluation.shape), "evaluation_source": eval_source, "notes": notes}
    return calibration, evaluation, info


def _held_back_windows(stream: torch.Tensor, num_windows: int, seq_len: int, notes: list[str]) -> torch.Tensor:
    """Up to num_windows non-overlapping windows of the held-back stream; one shorter window if it holds
    less than one. A note for each shortfall."""
    count = min(num_windows, len(stream) // seq_len)
    if count == 0:
        notes.append(f"evaluation runs on 1 window of {len(stream)} tokens, not {num_windows} of {seq_len}: the "
                     "held-back slice of the calibration text holds less than one window (give evaluation.dataset "
                     "for a full evaluation)")
        return stream.reshape(1, -1)
    if count < num_windows:
        notes.append(f"evaluation runs on {count} windows of {seq_len} tokens, not the {num_windows} asked: that "
                     "is all the held-back slice of the calibration text holds (give evaluation.dataset for more)")
    return stream[: count * seq_len].reshape(count, seq_len)
