"""Model size: parameter count, checkpoint bytes and effective bits per weight, without torch.

`checkpoint_stats(path)` reads only the safetensors headers of a Hugging Face model dir (8-byte little-endian header
length + JSON: dtype, shape, data_offsets per tensor), plus the raw bytes of a few tiny tensors
(compressed-tensors' `<layer>.weight_shape`), so it is cheap for any model size and needs no torch.

Understood layouts (compressed-tensors, as llmcompressor saves them):
  pack-quantized   `weight_packed` (int32, values packed densely along the input dim) + `weight_scale`
                   [+ `weight_zero_point` if asymmetric, packed] [+ `weight_g_idx`] + `weight_shape` (the dense shape)
  int-quantized    `weight` int8 + `weight_scale` [+ `weight_zero_point`]
  float-quantized  `weight` float8 + `weight_scale`
  nvfp4/mxfp4      `weight_packed` (uint8) + `weight_scale` [+ `weight_global_scale`]
  dense            fp32 / bf16 / fp16 weights
A layer is quantized when it has a `weight_scale`. Scales, zero points, g_idx, shapes and activation/KV scales are
storage, not parameters: `params` is the parameter count of the model as it runs (a packed layer counts out x in),
so a quantized checkpoint has exactly the parameters of its base model.

`weights_in_memory(model)` measures a loaded torch model (parameters + buffers, shared storage counted once).
`python -m qllm.measure.sizes DIR` prints the stats of a checkpoint dir as JSON.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

# safetensors dtype code -> (readable name, bits per element)
DTYPES: dict[str, tuple[str, float]] = {
    "F64": ("float64", 64), "F32": ("float32", 32), "F16": ("float16", 16), "BF16": ("bfloat16", 16),
    "F8_E4M3": ("float8_e4m3fn", 8), "F8_E5M2": ("float8_e5m2", 8), "F8_E8M0": ("float8_e8m0fnu", 8),
    "F6_E2M3": ("float6_e2m3", 6), "F6_E3M2": ("float6_e3m2", 6), "F4": ("float4_e2m1", 4),
    "I64": ("int64", 64), "I32": ("int32", 32), "I16": ("int16", 16), "I8": ("int8", 8),
    "U64": ("uint64", 64), "U32": ("uint32", 32), "U16": ("uint16", 16), "U8": ("uint8", 8), "BOOL": ("bool", 8),
}
_STRUCT_INT = {"I64": "q", "I32": "i", "I16": "h", "I8": "b", "U64": "Q", "U32": "I", "U16": "H", "U8": "B"}

# Leaf names (after the last ".") that store how a layer's weight is quantized; not parameters.
WEIGHT_QUANT_META = {
    "weight_scale": "scale", "weight_zero_point": "zero_point", "weight_g_idx": "g_idx", "weight_shape": "shape",
    "weight_global_scale": "scale",
}
# Activation / KV-cache quantization parameters (static schemes): stored, but neither weights nor parameters.
ACTIVATION_QUANT_META = {"input_scale", "input_zero_point", "input_global_scale", "output_scale",
                         "output_zero_point", "k_scale", "v_scale", "k_zero_point", "v_zero_point"}
PACKED = "weight_packed"


def _read_header(f: Path) -> tuple[dict, int]:
    """(tensor entries, offset of the data section) of one safetensors file."""
    with open(f, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def _read_ints(f: Path, data_start: int, entry: dict) -> list[int]:
    """The values of a small integer tensor (e.g. a `weight_shape`)."""
    code = entry["dtype"]
    begin, end = entry["data_offsets"]
    with open(f, "rb") as fh:
        fh.seek(data_start + begin)
        raw = fh.read(end - begin)
    size = struct.calcsize(_STRUCT_INT[code])
    return list(struct.unpack(f"<{len(raw) // size}{_STRUCT_INT[code]}", raw))


def safetensors_files(path: Path) -> list[Path]:
    """The weight files of a model dir: those of the shard index when there is one, else every *.safetensors."""
    if path.is_file():
        return [path]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    return sorted(path.glob("*.safetensors"))


def _config(path: Path) -> dict:
    cfg = path / "config.json" if path.is_dir() else path.with_name("config.json")
    try:
        return json.loads(cfg.read_text())
    except (OSError, ValueError):
        return {}


def _weight_kinds(qcfg: dict) -> tuple[Optional[int], Optional[str]]:
    """The weights' num_bits and type ("int"/"float") when every config group agrees, else None."""
    groups = [g.get("weights") or {} for g in (qcfg.get("config_groups") or {}).values()]
    bits = {g.get("num_bits") for g in groups if g}
    types = {g.get("type") for g in groups if g}
    return (bits.pop() if len(bits) == 1 else None), (types.pop() if len(types) == 1 else None)


def _prod(shape: list[int]) -> int:
    return math.prod(shape) if shape else 1


Tensor = tuple[Path, int, dict]  # (file, offset of its data section, header entry)


def _tensors(files: list[Path]) -> tuple[dict[str, Tensor], int]:
    """Every tensor of the files by name, and the files' total bytes."""
    tensors: dict[str, Tensor] = {}
    total = 0
    for f in files:
        header, start = _read_header(f)
        total += f.stat().st_size
        for name, entry in header.items():
            tensors[name] = (f, start, entry)
    return tensors, total


def _nbytes(entry: dict) -> int:
    begin, end = entry["data_offsets"]
    return end - begin


@dataclass
class _Tally:
    """Parameters and bytes by role, accumulated layer by layer."""

    cfg_bits: Optional[int]
    cfg_type: Optional[str]
    tied: bool
    embed_shapes: set
    params: int = 0
    quantized_params: int = 0
    quantized_layers: int = 0
    tensor_bytes: int = 0
    unquantized_bytes: int = 0
    activation_bytes: int = 0
    tied_duplicate_bytes: int = 0
    params_exact: bool = True
    parts: dict = field(default_factory=lambda: {"weights": 0, "scale": 0, "zero_point": 0, "g_idx": 0, "shape": 0})
    dtypes: dict = field(default_factory=dict)
    dtype_bytes: dict = field(default_factory=dict)
    layer_bits: set = field(default_factory=set)

    def add_dtype(self, name: str, n_params: int, n_bytes: int) -> None:
        self.dtypes[name] = self.dtypes.get(name, 0) + n_params
        self.dtype_bytes[name] = self.dtype_bytes.get(name, 0) + n_bytes

    def layer(self, prefix: str, leaves: dict[str, Tensor]) -> None:
        quantized = "weight_scale" in leaves  # a layer is quantized when it has a weight scale
        self.quantized_layers += quantized
        for leaf, (_, _, entry) in leaves.items():
            b = _nbytes(entry)
            self.tensor_bytes += b
            if leaf in ACTIVATION_QUANT_META:
                self.activation_bytes += b
            elif leaf in WEIGHT_QUANT_META:
                self.parts[WEIGHT_QUANT_META[leaf]] += b
            else:
                self._values(prefix, leaf, leaves, entry, b, quantized)

    def _values(self, prefix: str, leaf: str, leaves: dict, entry: dict, b: int, quantized: bool) -> None:
        """A tensor of parameters (a weight, packed or not; a bias; a norm)."""
        code = entry["dtype"]
        if leaf == PACKED:
            n, exact, bits = _unpacked_numel(leaves, entry, code, self.cfg_bits)
            self.params_exact &= exact
            if bits:
                self.layer_bits.add(bits)
            self.add_dtype(f"{self.cfg_type or 'int'}{bits}" if bits else "packed", n, b)
        else:
            n = _prod(entry["shape"])
            if (self.tied and prefix == "lm_head" and leaf == "weight" and not quantized
                    and tuple(entry["shape"]) in self.embed_shapes):
                self.tied_duplicate_bytes += b  # a tied lm_head saved anyway: the model holds it once
                self.unquantized_bytes += b
                return
            if quantized and leaf == "weight" and code in ("I8", "U8", "F8_E4M3", "F8_E5M2"):
                self.layer_bits.add(int(DTYPES[code][1]))
            self.add_dtype(DTYPES.get(code, (code.lower(), 0))[0], n, b)
        self.params += n
        if quantized and leaf in ("weight", PACKED):
            self.quantized_params += n
            self.parts["weights"] += b
        else:
            self.unquantized_bytes += b


def checkpoint_stats(path: str | Path) -> dict[str, Any]:
    """Size statistics of a HF model dir (or one .safetensors file), read from the safetensors headers.

    Keys: params, quantized_params, unquantized_params, quantized_layers, tensor_bytes, bytes_on_disk,
    safetensors_bytes, bits_per_weight, bits_per_weight_quantized (None when nothing is quantized), bytes of the
    quantized layers' storage by role (quantized_weight_bytes = packed/int/fp weights + scales + zero points + g_idx
    + shapes, and each part), unquantized_bytes, activation_quant_bytes, dtypes {dtype: params} (packed weights as
    e.g. "int4"), dtype_bytes {dtype: bytes}, quant_format, weight_bits, tied_embeddings, files, tensors, params_exact.
    """
    path = Path(path)
    files = safetensors_files(path)
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    config = _config(path)
    qcfg = config.get("quantization_config") or {}
    tied = bool(config.get("tie_word_embeddings", (config.get("text_config") or {}).get("tie_word_embeddings", False)))
    tensors, safetensors_bytes = _tensors(files)
    layers: dict[str, dict[str, Tensor]] = {}
    for name, t in tensors.items():
        prefix, _, leaf = name.rpartition(".")
        layers.setdefault(prefix, {})[leaf] = t
    embed_shapes = {tuple(e["shape"]) for n, (_, _, e) in tensors.items() if n.endswith("embed_tokens.weight")}
    t = _Tally(*_weight_kinds(qcfg), tied=tied, embed_shapes=embed_shapes)
    for prefix, leaves in layers.items():
        t.layer(prefix, leaves)

    quant_bytes = sum(t.parts.values())
    on_disk = path.stat().st_size if path.is_file() else sum(
        f.stat().st_size for f in path.rglob("*") if f.is_file())
    return {
        "params": t.params,
        "quantized_params": t.quantized_params,
        "unquantized_params": t.params - t.quantized_params,
        "quantized_layers": t.quantized_layers,
        "tensor_bytes": t.tensor_bytes,
        "bytes_on_disk": on_disk,
        "safetensors_bytes": safetensors_bytes,
        "bits_per_weight": t.tensor_bytes * 8 / t.params if t.params else None,
        "bits_per_weight_quantized": quant_bytes * 8 / t.quantized_params if t.quantized_params else None,
        "quantized_weight_bytes": quant_bytes,
        "quantized_values_bytes": t.parts["weights"],
        "quant_scale_bytes": t.parts["scale"],
        "quant_zero_point_bytes": t.parts["zero_point"],
        "quant_g_idx_bytes": t.parts["g_idx"],
        "quant_shape_bytes": t.parts["shape"],
        "unquantized_bytes": t.unquantized_bytes,
        "activation_quant_bytes": t.activation_bytes,
        "dtypes": dict(sorted(t.dtypes.items())),
        "dtype_bytes": dict(sorted(t.dtype_bytes.items())),
        "quant_format": qcfg.get("format") if qcfg else None,
        "weight_bits": sorted(t.layer_bits)[0] if len(t.layer_bits) == 1 else (sorted(t.layer_bits) or None),
        "tied_embeddings": tied,
        "tied_duplicate_bytes": t.tied_duplicate_bytes,
        "files": len(files),
        "tensors": len(tensors),
        "params_exact": t.params_exact,
    }


def _unpacked_numel(leaves: dict, packed: dict, code: str, cfg_bits: Optional[int]) -> tuple[int, bool, Optional[int]]:
    """(dense element count, exact?, bits per value) of a packed weight: from its `weight_shape` when saved, else
    the packed shape x values per packed element (config num_bits; int32 packs 32/bits values densely)."""
    elem_bits = DTYPES.get(code, ("", 32))[1]
    shape = list(packed["shape"])
    if "weight_shape" in leaves and leaves["weight_shape"][2]["dtype"] in _STRUCT_INT:
        f, start, entry = leaves["weight_shape"]
        dense = _read_ints(f, start, entry)
        n = _prod(dense)
        bits = cfg_bits
        if bits is None and dense and dense[-1] >= 32:
            bits = int(shape[-1] * elem_bits // dense[-1])  # dense packing: ceil(cols*bits/elem) packed columns
        return n, True, bits
    bits = cfg_bits or 4
    cols = int(shape[-1] * elem_bits // bits)
    return _prod(shape[:-1]) * cols, False, bits


def weights_in_memory(model: Any) -> dict[str, Any]:
    """Bytes and element counts of a loaded torch model's parameters + buffers as they sit in memory.

    Shared storage is counted once (tied embeddings, views): per storage, the union of the byte ranges its tensors
    use. Tensors on the meta device (offloaded / not materialised) are counted apart, not as bytes in memory.
    Keys: bytes, param_bytes, buffer_bytes, params, buffer_elements, tensors, bytes_by_device, dtypes {dtype: bytes},
    meta_tensors.
    """
    import torch

    ranges: dict[tuple[str, int], list[tuple[int, int, str]]] = {}  # storage -> [(begin, end, role)]
    seen: set[tuple] = set()
    counts = {"params": 0, "buffer_elements": 0, "tensors": 0, "meta_tensors": 0}
    dtypes: dict[str, int] = {}

    def visit(t: torch.Tensor, role: str) -> None:
        if t is None:
            return
        if t.device.type == "meta":
            counts["meta_tensors"] += 1
            return
        ptr = t.untyped_storage().data_ptr()
        begin = t.storage_offset() * t.element_size()
        key = (str(t.device), ptr, begin, tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in seen:
            return
        seen.add(key)
        counts["tensors"] += 1
        counts["params" if role == "param" else "buffer_elements"] += t.numel()
        if t.numel() and t.is_contiguous():
            end = begin + t.numel() * t.element_size()
        else:  # strided view: the span it touches
            end = begin + (sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1) * t.element_size() \
                if t.numel() else begin
        ranges.setdefault((str(t.device), ptr), []).append((begin, end, role))
        name = str(t.dtype).removeprefix("torch.")
        dtypes[name] = dtypes.get(name, 0) + (end - begin)

    for p in model.parameters():
        visit(p, "param")
    for b in model.buffers():
        visit(b, "buffer")

    by_role = {"param": 0, "buffer": 0}
    by_device: dict[str, int] = {}
    for (device, _), spans in ranges.items():
        spans.sort()
        cur_b, cur_e, cur_role = spans[0]
        merged = []
        for b, e, role in spans[1:]:
            if b < cur_e:  # overlap: one run of bytes (a parameter wins over a buffer)
                cur_e = max(cur_e, e)
                cur_role = "param" if "param" in (cur_role, role) else cur_role
            else:
                merged.append((cur_b, cur_e, cur_role))
                cur_b, cur_e, cur_role = b, e, role
        merged.append((cur_b, cur_e, cur_role))
        for b, e, role in merged:
            by_role[role] += e - b
            by_device[device] = by_device.get(device, 0) + e - b
    return {
        "bytes": by_role["param"] + by_role["buffer"],
        "param_bytes": by_role["param"],
        "buffer_bytes": by_role["buffer"],
        **counts,
        "bytes_by_device": by_device,
        "dtypes": dict(sorted(dtypes.items())),
    }


def main(argv: Optional[list[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m qllm.measure.sizes MODEL_DIR [MODEL_DIR ...]", file=sys.stderr)
        return 2
    for a in args:
        print(json.dumps({"path": a, **checkpoint_stats(a)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
