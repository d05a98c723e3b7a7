"""Calibration and evaluation text: load documents, tokenize them into fixed windows.

Window protocols (kept fixed so results compare across jobs and tools):
- the token stream is every document tokenized without special tokens, with the tokenizer's EOS
  token between consecutive documents;
- calibration (`make_windows`): `num_samples` windows of `seq_len` tokens starting at offsets drawn
  uniformly from [0, len(stream) - seq_len] by a torch.Generator seeded with `seed`;
- evaluation (`contiguous_windows`): the first `num_windows` non-overlapping windows of the stream.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path, PurePosixPath

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError
from torch import Tensor

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(/[\w./-]+)?$")
_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")


class DataError(ValueError):
    """Calibration or evaluation data that cannot be used, with the reason."""


def load_texts(
    source: str,
    split: str = "train",
    text_field: str = "text",
    local_roots: list[Path] | None = None,
    allow_local: bool = True,
    token: str | None = None,
    cache_dir: Path | None = None,
) -> list[str]:
    """Documents from a local file or folder, or from a Hugging Face Hub dataset.

    source: a local `.txt` / `.jsonl` / `.parquet` file, a local folder laid out like a Hub dataset
    snapshot, or a Hub dataset id (`owner/name`, optionally `owner/name/subfolder` to pick one
    configuration folder). Local paths must lie inside one of `local_roots` when it is given, and
    are refused when `allow_local` is False (e.g. for jobs submitted over HTTP).
    """
    path = Path(source).expanduser()
    spelled_local = source.startswith(("/", ".", "~"))
    if not allow_local:  # decided by the spelling alone: the filesystem is never asked
        if spelled_local:
            raise DataError(f"local data sources are not allowed here: {source!r}")
        files = _download_hub_split(source, split, token, cache_dir)
    elif path.exists():
        path = _check_inside_roots(path, local_roots)
        files = [path] if path.is_file() else _split_files(path, split)
    elif path.is_absolute() or path.suffix in TEXT_SUFFIXES or spelled_local:
        raise DataError(f"data file {source!r} does not exist")
    else:
        files = _download_hub_split(source, split, token, cache_dir)
    texts = [doc for file in files for doc in read_text_file(file, text_field)]
    if not texts:
        raise DataError(f"{source!r} (split {split!r}) holds no non-empty documents")
    return texts


def read_text_file(path: Path, text_field: str = "text") -> list[str]:
    """Non-empty documents of one file; see load_texts for the formats."""
    suffix = path.suffix.lower()
    readers = {".txt": _read_txt, ".jsonl": lambda p: _read_jsonl(p, text_field),
               ".parquet": lambda p: _read_parquet(p, text_field)}
    if suffix not in readers:
        raise DataError(f"{path.name}: unknown file type {suffix!r}; use one of {', '.join(TEXT_SUFFIXES)}")
    try:
        docs = readers[suffix](path)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path.name}: not UTF-8 text (byte {exc.start} cannot be decoded)") from None
    except DataError:
        raise
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError; its text may name server paths
        raise DataError(f"{path.name}: not a readable {suffix[1:]} file ({exc.__class__.__name__})") from None
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"{path.name} holds no non-empty documents")
    return docs


def _read_txt(path: Path) -> list[str]:
    """One document per blank-line separated paragraph; without blank lines, one per line."""
    text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
    if _BLANK_LINE.search(text):
        return [p.strip() for p in _BLANK_LINE.split(text)]
    return [line.strip() for line in text.split("\n")]


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    docs = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path.name} line {number}: invalid JSON ({exc.msg})") from exc
            if not isinstance(record, dict) or text_field not in record:
                raise DataError(f"{path.name} line {number}: no field {text_field!r}")
            if not isinstance(record[text_field], str):
                raise DataError(f"{path.name} line {number}: field {text_field!r} is not a string")
            docs.append(record[text_field])
    return docs


def _read_parquet(path: Path, text_field: str) -> list[str]:
    import pyarrow.parquet as pq

    columns = pq.read_schema(path).names
    if text_field not in columns:
        raise DataError(f"{path.name}: no column {text_field!r}; columns are {columns}")
    values = pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()
    if any(v is not None and not isinstance(v, str) for v in values):
        raise DataError(f"{path.name}: column {text_field!r} is not a string column")
    return [v for v in values if v is not None]


def _check_inside_roots(path: Path, roots: list[Path] | None) -> Path:
    resolved = path.resolve()
    if roots is None:
        return resolved
    for root in roots:
        if resolved.is_relative_to(Path(root).resolve()):
            return resolved
    raise DataError("the data path is outside the allowed data folders")


def _split_files(folder: Path, split: str) -> list[Path]:
    """The data files of one split in a folder laid out like a Hub dataset snapshot.

    A file belongs to the split when a folder on its path is named after the split, or its name
    is the split followed by '.', '-' or '_' (train.jsonl, data/train-00000-of-00002.parquet).
    """
    relative = sorted(
        str(PurePosixPath(*p.relative_to(folder).parts))
        for p in folder.rglob("*")
        if p.is_file() and p.suffix in TEXT_SUFFIXES and not any(part.startswith(".") for part in p.parts)
    )
    chosen = select_split_files(relative, split)
    if not chosen:
        raise DataError(  # how many, not which: the folder's file names are not the caller's to read
            f"the dataset folder has no {'/'.join(TEXT_SUFFIXES)} files for split {split!r} "
            f"({len(relative)} data files of other splits)"
        )
    return [folder / name for name in chosen]


def select_split_files(relative_paths: list[str], split: str) -> list[str]:
    """The paths (posix, relative to a dataset root) holding `split`, refusing a mix of configs."""
    name_pattern = re.compile(rf"^{re.escape(split)}([.\-_].*)?$")
    chosen = []
    for rel in relative_paths:
        parts = PurePosixPath(rel).parts
        stem = PurePosixPath(rel).name[: -len(PurePosixPath(rel).suffix)]
        if split in parts[:-1] or name_pattern.match(stem):
            chosen.append(rel)
    # What is left of a file's folder once the split and "data" levels are removed names its config.
    config_folders = {
        "/".join(part for part in PurePosixPath(rel).parent.parts if part not in (split, "data")) for rel in chosen
    }
    if len(config_folders) > 1:
        raise DataError(
            f"split {split!r} exists in several configurations ({', '.join(sorted(config_folders))}); "
            "name one as owner/dataset/<configuration folder>"
        )
    suffixes = {PurePosixPath(rel).suffix for rel in chosen}
    if len(suffixes) > 1:
        raise DataError(f"split {split!r} mixes file types {sorted(suffixes)}; cannot tell which to use")
    return chosen


def hub_allow_patterns(split: str, subfolder: str | None = None) -> list[str]:
    """Download patterns for one split (fnmatch: '*' also matches '/')."""
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    return [f"{prefix}*{split}*{suffix}" for suffix in TEXT_SUFFIXES]


def _download_hub_split(source: str, split: str, token: str | None, cache_dir: Path | None) -> list[Path]:
    if not _HUB_ID.match(source):
        raise DataError(f"{source!r} is neither an existing file nor a Hugging Face dataset id")
    parts = source.split("/")
    repo_id, subfolder = "/".join(parts[:2]), "/".join(parts[2:]) or None
    try:
        root = Path(
            snapshot_download(
                repo_id,
                repo_type="dataset",
                allow_patterns=hub_allow_patterns(split, subfolder),
                token=token,
                cache_dir=cache_dir,
            )
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, HFValidationError, OSError) as exc:
        raise DataError(f"could not download dataset {repo_id!r} from the Hugging Face Hub ({exc.__class__.__name__}: "
                        "not found, private without a token, or the Hub is unreachable)") from exc
    return _split_files(root / subfolder if subfolder else root, split)


def token_stream(tokenizer, texts: list[str]) -> Tensor:
    """All documents as one LongTensor of token ids, EOS between consecutive documents."""
    if not texts:
        raise DataError("no documents to tokenize")
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for i, doc in enumerate(ids):
        if i and eos is not None:
            stream.append(eos)
        stream.extend(doc)
    return torch.tensor(stream, dtype=torch.long)


def make_windows(tokenizer, texts: list[str], num_samples: int, seq_len: int, seed: int) -> Tensor:
    """(num_samples, seq_len) calibration windows at seeded random offsets of the token stream."""
    return stream_windows(token_stream(tokenizer, texts), num_samples, seq_len, seed)


def stream_windows(stream: Tensor, num_samples: int, seq_len: int, seed: int) -> Tensor:
    """make_windows on a token stream (len,) already built."""
    if len(stream) < seq_len + 1:
        raise DataError(
            f"calibration text has {len(stream)} tokens; at least {seq_len + 1} are needed for "
            f"windows of {seq_len} tokens"
        )
    if not -(2**63) <= seed < 2**64:
        raise DataError("calibration.seed must fit in 64 bits")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seq_len + 1, (num_samples,), generator=generator)
    offsets = starts.unsqueeze(1) + torch.arange(seq_len).unsqueeze(0)  # (num_samples, seq_len)
    return stream[offsets]


def contiguous_windows(tokenizer, texts: list[str], num_windows: int, seq_len: int) -> Tensor:
    """(num_windows, seq_len): the first num_windows non-overlapping windows of the token stream."""
    stream = token_stream(tokenizer, texts)
    available = len(stream) // seq_len
    if available < num_windows:
        raise DataError(
            f"evaluation text has {len(stream)} tokens: {available} windows of {seq_len}, {num_windows} requested"
        )
    return stream[: num_windows * seq_len].reshape(num_windows, seq_len)


def windows_hash(windows: Tensor) -> str:
    """sha256 over the shape and the little-endian int64 token ids; identifies a window set."""
    digest = hashlib.sha256(str(tuple(windows.shape)).encode())
    digest.update(windows.to(torch.int64).contiguous().numpy().astype("<i8").tobytes())
    return digest.hexdigest()
