"""What the Hugging Face families share: safetensors folders, config.json, rope parameters, and the drivers.

Folders: `model.safetensors`, or shards `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`
(`weight_map`: tensor name -> shard file). Files are read and written here without torch: the format is an
8-byte little-endian header length, a JSON header (name -> dtype, shape, data_offsets; `__metadata__`), then
the raw little-endian tensor bytes. bfloat16 and float8 tensors map to ml_dtypes; tensors are memory-mapped,
so a large checkpoint is read one tensor at a time.

Drivers: `import_hf(HF_DIR, RUN_DIR)` builds the recipe config from config.json (a family's model_fields),
converts every tensor (its from_hf), checks the names and shapes against the model the config builds, and
writes checkpoint step 0 with a fresh optimizer state (tools.import_safetensors.write_run) plus
RUN_DIR/hf_source/ (the source's config.json, generation_config.json and tokenizer files, so an export
reproduces them). `export_hf(RUN_DIR, OUT_DIR)` is the inverse (a family's to_hf).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import struct
from collections.abc import Callable, Iterable
from typing import Any

import ml_dtypes
import numpy as np

from axlearn_like.config import ConfigError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SOURCE_DIR = "hf_source"  # inside a run dir: the imported folder's config and tokenizer files
# Files copied from an HF folder into RUN_DIR/hf_source/ on import, and from there into an export.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")
DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
EXPORT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                 "float16": np.dtype(np.float16)}


class UnsupportedError(ConfigError):
    """A Hugging Face config field or tensor with no exact counterpart here; one line naming the field."""


def check(ok: bool, field: str, message: str) -> None:
    """Raises UnsupportedError(f"{field}: {message}") unless ok."""
    if not ok:
        raise UnsupportedError(f"{field}: {message}")


# ------------------------------------------------------------------------------------------ safetensors
def read_header(path: str) -> tuple[dict, int]:
    """-> (header dict without __metadata__, byte offset of the data); one-line ValueError on a bad file."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000 or n > os.path.getsize(path) - 8:
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a readable safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    return header, 8 + n


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> int:
    """Writes `tensors` (numpy, any dtype of DTYPES) to `path` atomically; returns the data size in bytes."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {})} if metadata else {}
    offset, order = 0, []
    for name in tensors:
        a = np.ascontiguousarray(tensors[name])
        if a.dtype not in DTYPE_NAMES:
            raise ValueError(f"{name}: dtype {a.dtype} cannot be stored in safetensors")
        header[name] = {"dtype": DTYPE_NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        order.append(a)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the safetensors library writes it
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for a in order:
            f.write(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())
    os.replace(tmp, path)
    return offset


class TensorReader:
    """The tensors of an HF folder by name, memory-mapped. `get(name)` returns float tensors as float32 and
    records the name as used; `unused()` lists the names no converter read."""

    def __init__(self, folder: str):
        self.folder = folder
        self._where: dict[str, tuple[str, dict, int]] = {}
        self._used: set[str] = set()
        for path in safetensors_files(folder):
            header, start = read_header(path)
            for name, info in header.items():
                if name in self._where:
                    first = os.path.basename(self._where[name][0])
                    raise ValueError(f"{folder}: tensor {name!r} is stored twice ({first} "
                                     f"and {os.path.basename(path)})")
                self._where[name] = (path, info, start)

    @property
    def names(self) -> list[str]:
        return sorted(self._where)

    def has(self, name: str) -> bool:
        return name in self._where

    def dtype(self, name: str) -> str:
        """The stored dtype name (e.g. 'BF16')."""
        return self._info(name)[1]["dtype"]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._info(name)[1]["shape"])

    def _info(self, name: str) -> tuple[str, dict, int]:
        if name not in self._where:
            raise UnsupportedError(f"{name}: the tensor is missing from {self.folder} (the config.json asks for it)")
        return self._where[name]

    def raw(self, name: str) -> np.ndarray:
        """The tensor in its stored dtype (read-only memory map)."""
        path, info, start = self._info(name)
        self._used.add(name)
        dt = DTYPES.get(info["dtype"])
        if dt is None:
            raise UnsupportedError(f"{name}: stored dtype {info['dtype']} is not supported")
        shape = tuple(int(d) for d in info["shape"])
        begin, end = info["data_offsets"]
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dt.itemsize:
            raise ValueError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {list(shape)} {info['dtype']}")
        if end == begin:
            return np.zeros(shape, dt)
        return np.memmap(path, dtype=dt.newbyteorder("<"), mode="r", offset=start + begin, shape=shape)

    def get(self, name: str) -> np.ndarray:
        """The tensor as an in-memory array; floating point as float32 (exact for bf16/f16/f32)."""
        a = self.raw(name)
        if a.dtype.kind == "f" or a.dtype in (DTYPES["BF16"], DTYPES["F8_E4M3"], DTYPES["F8_E5M2"]):
            if a.dtype == DTYPES["F64"]:
                raise UnsupportedError(f"{name}: float64 tensors would lose precision in the float32 params")
            return np.asarray(a, np.float32)
        return np.array(a)

    def float_dtypes(self) -> set[str]:
        return {info["dtype"] for _, info, _ in self._where.values() if info["dtype"] in ("F32", "F16", "BF16", "F64")}

    def unused(self, ignored: Iterable[str] = ()) -> list[str]:
        pats = [re.compile(p) for p in ignored]
        return [n for n in self.names if n not in self._used and not any(p.fullmatch(n) for p in pats)]


def safetensors_files(folder: str) -> list[str]:
    """The weight files of an HF folder: the index's shards, else model.safetensors; one-line errors."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder} is not a directory; pass a Hugging Face model folder")
    index = os.path.join(folder, INDEX_NAME)
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a valid safetensors index ({type(e).__name__}: {e})") from None
        files = sorted(set(weight_map.values()))
        missing = [n for n in files if not os.path.exists(os.path.join(folder, n))]
        if missing:
            raise FileNotFoundError(f"{folder}: shard(s) {', '.join(missing[:3])} named in {INDEX_NAME} are missing")
        return [os.path.join(folder, n) for n in files]
    single = os.path.join(folder, SINGLE_NAME)
    if os.path.exists(single):
        return [single]
    shards = sorted(n for n in os.listdir(folder) if re.fullmatch(r"model-\d+-of-\d+\.safetensors", n))
    if shards:
        return [os.path.join(folder, n) for n in shards]
    if any(n.endswith((".bin", ".pt", ".pth")) for n in os.listdir(folder)):
        raise FileNotFoundError(f"{folder} holds PyTorch pickles only; this tool reads safetensors (re-save the model "
                                f"with save_pretrained(..., safe_serialization=True))")
    raise FileNotFoundError(f"{folder} has no {SINGLE_NAME} or {INDEX_NAME}; pass a Hugging Face model folder")


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def write_folder(out_dir: str, tensors: dict[str, np.ndarray], max_shard_bytes: int) -> list[str]:
    """Writes model.safetensors, or shards of at most max_shard_bytes (a larger tensor gets its own) with
    model.safetensors.index.json. Tensors go in natural name order, so a shard holds consecutive layers."""
    names = sorted(tensors, key=_natural_key)
    shards: list[list[str]] = [[]]
    size = 0
    for n in names:
        b = tensors[n].nbytes
        if shards[-1] and size + b > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += b
    meta = {"format": "pt"}  # what transformers' from_pretrained expects of a safetensors file
    if len(shards) == 1:
        write_safetensors(os.path.join(out_dir, SINGLE_NAME), {n: tensors[n] for n in names}, meta)
        return [SINGLE_NAME]
    files, weight_map, total = [], {}, 0
    for i, group in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(os.path.join(out_dir, fname), {n: tensors[n] for n in group}, meta)
        weight_map.update({n: fname for n in group})
        files.append(fname)
    _write_json(os.path.join(out_dir, INDEX_NAME), {"metadata": {"total_size": total}, "weight_map": weight_map})
    return files + [INDEX_NAME]


def _write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '2GiB' / '123' -> bytes (decimal units as Hugging Face's max_shard_size)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]i?[bB]?|[bB])?\s*", text)
    if not m:
        raise ValueError(f"--max-shard-size {text!r}: give a size like 5GB, 500MB or a byte count")
    unit = (m.group(2) or "b").lower().rstrip("b")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
             "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}[unit]
    return max(1, int(float(m.group(1)) * scale))


# ------------------------------------------------------------------------------------------ config.json
def read_hf_config(folder: str) -> dict:
    """config.json of an HF folder as a dict with `model_type`; one-line errors."""
    path = os.path.join(folder, "config.json")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder} is not a directory; pass a Hugging Face model folder")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing; HF_DIR must hold config.json and the safetensors weights")
    try:
        with open(path) as f:
            hf = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(hf, dict) or "model_type" not in hf:
        if isinstance(hf, dict) and "_type" in hf:
            raise ValueError(f"{path} is an axlearn_like config, not a Hugging Face one; "
                             f"use python -m tools.import_safetensors")
        raise ValueError(f"{path} has no model_type; it is not a Hugging Face model config")
    return hf


def rope_parameters(hf: dict) -> dict:
    """The rope settings of a config.json in either spelling (transformers 5 `rope_parameters`, or
    `rope_theta` + `rope_scaling` {"type" | "rope_type": ...}) -> {rope_type, rope_theta, ...}, with
    original_max_position_embeddings defaulting to max_position_embeddings as transformers does."""
    rp = hf.get("rope_parameters")
    if isinstance(rp, dict) and any(isinstance(v, dict) for v in rp.values()):
        raise UnsupportedError("rope_parameters: per-layer-type rope settings are not supported")
    rp = dict(rp or hf.get("rope_scaling") or {})
    rp.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    rp["rope_type"] = rp.get("rope_type") or rp.get("type") or "default"
    rp.pop("type", None)
    if rp["rope_type"] in ("llama3", "yarn", "longrope"):
        orig = hf.get("original_max_position_embeddings")
        if orig is not None:
            rp["original_max_position_embeddings"] = orig
        elif rp.get("original_max_position_embeddings") is None:
            rp["original_max_position_embeddings"] = hf.get("max_position_embeddings")
    return rp


def torch_dtype_name(hf: dict) -> str | None:
    """config.json's dtype (`dtype` in transformers 5, `torch_dtype` before) or None."""
    d = hf.get("dtype", hf.get("torch_dtype"))
    return d if isinstance(d, str) else None


# ------------------------------------------------------------------------------------------ tree helpers
def set_path(tree: dict, path: str, value: Any) -> None:
    """tree['a']['b']['c'] = value for path 'a/b/c' (creating the dicts)."""
    parts = path.split("/")
    for p in parts[:-1]:
        tree = tree.setdefault(p, {})
    tree[parts[-1]] = value


def get_path(tree: dict, path: str) -> Any:
    for p in path.split("/"):
        tree = tree[p]
    return tree


def flat_names(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flat_names(v, f"{prefix}{k}/"))
        elif dataclasses.is_dataclass(v) and not isinstance(v, type):  # a stats struct, e.g. MoE's RoutingBias
            fields = {f.name: getattr(v, f.name) for f in dataclasses.fields(v) if f.metadata.get("pytree_node", True)}
            out.update(flat_names(fields, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def heads_in(w: np.ndarray, heads: int) -> np.ndarray:
    """torch Linear weight [heads * head_dim, D] -> our per-head kernel [D, heads, head_dim]."""
    return np.ascontiguousarray(np.transpose(w.reshape(heads, -1, w.shape[-1]), (2, 0, 1)))


def heads_out(k: np.ndarray) -> np.ndarray:
    """Inverse of heads_in: [D, heads, head_dim] -> [heads * head_dim, D]."""
    return np.ascontiguousarray(np.transpose(k, (1, 2, 0)).reshape(-1, k.shape[0]))


def linear_in(w: np.ndarray) -> np.ndarray:
    """torch Linear weight [out, in] -> our Dense kernel [in, out]."""
    return np.ascontiguousarray(w.T)


linear_out = linear_in  # [in, out] -> [out, in]


# ------------------------------------------------------------------------------------------ drivers
def _recipe_config(recipe: str):
    import importlib

    return importlib.import_module(f"recipes.{recipe}").config()


def build_config(hf: dict, family, overrides: Iterable[str] = (), tokenizer: str | None = None):
    """The experiment config an import writes: recipes.<family.RECIPE>.config() with the model fields from
    config.json (the recipe's dtype, scan/remat and training settings stay), then `overrides`."""
    from axlearn_like import config as config_lib

    cfg = _recipe_config(family.RECIPE)
    fields = family.model_fields(hf)
    cfg.model = dataclasses.replace(cfg.model, **fields)
    if hasattr(cfg.model, "sample"):
        cfg.model.sample = dataclasses.replace(cfg.model.sample)
    # cfg.name stays the recipe's: `python -m recipes.<RECIPE> --run-dir RUN_DIR` continues only runs of its own
    # configs (the source's model_type is in RUN_DIR/hf_source/config.json)
    if tokenizer is not None and hasattr(cfg.data, "tokenizer"):
        cfg.data.tokenizer = tokenizer
    return config_lib.apply_overrides(cfg, list(overrides))


def _abstract_trees(cfg) -> tuple[dict, dict]:
    """(params, stats) of the model `cfg` builds as {flat name: (shape, dtype)}, unscanned layout."""
    import jax

    from axlearn_like.state_setup import build_state_setup
    from models.decoder import unstack_layer_params

    state = build_state_setup(cfg).abstract_state
    out = []
    for tree in (state.params, state.stats):
        zeros = jax.tree.map(lambda s: np.broadcast_to(np.zeros((), s.dtype), s.shape), tree)
        if getattr(cfg.model, "scan_layers", False):
            zeros = unstack_layer_params(zeros, cfg.model)
        out.append({k: (tuple(v.shape), v.dtype) for k, v in flat_names(zeros).items()})
    return out[0], out[1]


def _check_tree(got: dict, want: dict, what: str) -> None:
    got_flat = flat_names(got)
    missing, extra = sorted(set(want) - set(got_flat)), sorted(set(got_flat) - set(want))
    if missing or extra:
        raise ValueError(f"converted {what} do not match the model: missing {missing[:4]}, unexpected {extra[:4]} "
                         f"(a converter bug; please report it with the config.json)")
    for k, (shape, _) in want.items():
        if tuple(np.shape(got_flat[k])) != shape:
            raise UnsupportedError(f"{k}: converted shape {list(np.shape(got_flat[k]))}, the model has {list(shape)} "
                                   f"(config.json and the tensors disagree)")


def import_hf(hf_dir: str, run_dir: str, *, step: int = 0, overrides: Iterable[str] = (),
              add_to_existing: bool = False) -> tuple[str, str]:
    """HF folder -> checkpoint `step` of run_dir (fresh optimizer state) + RUN_DIR/hf_source/. -> (checkpoint
    dir, recipe name). Everything is checked before anything is written."""
    import jax
    import jax.numpy as jnp

    from axlearn_like import rundir
    from models.decoder import stack_layer_params
    from tools.hf import family_for
    from tools.import_safetensors import write_run

    hf = read_hf_config(hf_dir)
    family = family_for(hf["model_type"])
    if not rundir.is_empty_run_dir(run_dir) and not add_to_existing:
        raise ValueError(f"run dir {run_dir} is not empty; import into a new run dir, or pass --add-to-existing to add "
                         f"the import as a later checkpoint of that run (nothing is deleted)")
    tensors = TensorReader(hf_dir)
    tok = os.path.join(hf_dir, "tokenizer.json")
    tokenizer = os.path.abspath(os.path.join(run_dir, SOURCE_DIR, "tokenizer.json")) if os.path.exists(tok) else None
    cfg = build_config(hf, family, overrides, tokenizer)
    params, stats = family.from_hf(hf, cfg.model, tensors)
    left = tensors.unused(getattr(family, "IGNORED", ()))
    if left:
        raise UnsupportedError(f"{left[0]}: {len(left)} tensor(s) of {hf_dir} have no counterpart in the model "
                               f"({', '.join(left[:3])}{', ...' if len(left) > 3 else ''})")
    want_params, want_stats = _abstract_trees(cfg)
    _check_tree(params, want_params, "parameters")
    if stats is not None:
        _check_tree(stats, want_stats, "stats")
    if getattr(cfg.model, "scan_layers", False):
        params = jax.tree.map(np.asarray, stack_layer_params(jax.tree.map(jnp.asarray, params), cfg.model))
        if stats is not None:
            stats = jax.tree.map(np.asarray, stack_layer_params(jax.tree.map(jnp.asarray, stats), cfg.model))
    ckpt = write_run(run_dir, cfg, params, step=step, source=os.path.abspath(hf_dir), add_to_existing=add_to_existing,
                     stats=stats)
    src = os.path.join(run_dir, SOURCE_DIR)
    os.makedirs(src, exist_ok=True)
    for name in SIDE_FILES:
        if os.path.exists(os.path.join(hf_dir, name)):
            shutil.copyfile(os.path.join(hf_dir, name), os.path.join(src, name))
    return ckpt, family.RECIPE


def _source_config(run_dir: str) -> dict | None:
    path = os.path.join(run_dir, SOURCE_DIR, "config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def choose_family(model, base: dict | None, model_type: str | None):
    """The family that writes `model`: --model-type's, else the imported source's, else the first that accepts it."""
    from tools.hf import family_for, family_modules

    wanted = model_type or (base or {}).get("model_type")
    if wanted is not None:
        family = family_for(wanted)
        reason = family.accepts(model)
        if reason is not None:
            raise UnsupportedError(f"--model-type {wanted}: this model cannot be written as {wanted} ({reason})")
        return family
    reasons = []
    for family in family_modules():
        reason = family.accepts(model)
        if reason is None:
            return family
        reasons.append(f"{family.__name__.rsplit('.', 1)[-1]}: {reason}")
    raise UnsupportedError(f"model: no Hugging Face family writes this model exactly ({'; '.join(reasons)})")


def export_hf(run_dir: str, out_dir: str, *, step: int | None = None, model_type: str | None = None,
              dtype: str | None = None, max_shard_size: str = "5GB", overwrite: bool = False) -> tuple[str, list[str]]:
    """Checkpoint of run_dir -> an HF folder (config.json, safetensors, the source's tokenizer files). ->
    (model_type, files written)."""
    import jax

    from axlearn_like import checkpoint
    from models.decoder import unstack_layer_params
    from tools.export_safetensors import check_out_dir

    max_bytes = parse_size(max_shard_size)
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of {list(EXPORT_DTYPES)}")
    check_out_dir(out_dir, ("config.json", SINGLE_NAME, INDEX_NAME), overwrite)
    if not os.path.isdir(checkpoint.checkpoint_dir(run_dir)):
        raise FileNotFoundError(f"{run_dir} has no checkpoints/; pass a run dir (written by a recipe or "
                                f"tools.import_hf)")
    base = _source_config(run_dir)
    _, variables, cfg = checkpoint.load(run_dir, step, masters=True)
    model = cfg.model
    family = choose_family(model, base, model_type)
    params = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), variables["params"])
    stats = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), variables.get("stats") or {})
    if getattr(model, "scan_layers", False):
        params = jax.tree.map(np.asarray, unstack_layer_params(params, model))
        stats = jax.tree.map(np.asarray, unstack_layer_params(stats, model))
    hf_cfg, tensors = family.to_hf(model, params, stats, base, model_type)
    name = dtype or (torch_dtype_name(base) if base else None) or "float32"
    if name not in EXPORT_DTYPES:
        name = "float32"
    out_dt = EXPORT_DTYPES[name]
    tensors = {k: np.asarray(v).astype(out_dt) if np.asarray(v).dtype.kind == "f" else np.asarray(v)
               for k, v in tensors.items()}
    hf_cfg = {**hf_cfg, "dtype": name}
    hf_cfg.pop("torch_dtype", None)
    os.makedirs(out_dir, exist_ok=True)
    for stale in os.listdir(out_dir):  # --overwrite: an earlier export's weights must not mix with these
        if stale in (SINGLE_NAME, INDEX_NAME) or re.fullmatch(r"model-\d+-of-\d+\.safetensors", stale):
            os.remove(os.path.join(out_dir, stale))
    files = write_folder(out_dir, tensors, max_bytes)
    _write_json(os.path.join(out_dir, "config.json"), hf_cfg)
    files.append("config.json")
    src = os.path.join(run_dir, SOURCE_DIR)
    for fname in SIDE_FILES[1:]:
        if os.path.exists(os.path.join(src, fname)):
            shutil.copyfile(os.path.join(src, fname), os.path.join(out_dir, fname))
            files.append(fname)
    return hf_cfg["model_type"], files


def base_fields(base: dict | None, model_type: str, keep: Callable[[str], bool] | None = None) -> dict:
    """The source config.json's fields to carry into an export of the same model_type (token ids, lengths...)."""
    if not base or base.get("model_type") != model_type:
        return {}
    return {k: v for k, v in base.items() if keep is None or keep(k)}
