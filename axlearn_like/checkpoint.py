"""Checkpointing with orbax: async CheckpointManager over {state, data iterator, config, meta} items.

Layout of RUN_DIR/checkpoints/<step>/: `state` (the TrainState: params, opt_state, step, rng, stats, carry),
`data` (grain iterator state, one file per process: `process_<i>-of-<n>.json`), `config` (resolved config
JSON), `meta` (versions, mesh, process count), `checksums` (two 32-bit hashes per array, `_array_checksum`).
orbax writes each step to a temporary directory and renames it when complete, so a half-written checkpoint is
never listed. Restoring a step checks, in order: its arrays' tree/shapes/dtypes against the target
(a difference is a config change: CheckpointMismatchError, one line naming the arrays and config fields),
that every file reads back, and every array against its checksum (silent bit rot). A step failing the
last two is corrupt: training moves it aside to `<step>.corrupt-<UTC time>` (never deletes it) and falls
back to the previous step; tools only skip it.

Migration on read of declared caches: when every difference between the saved arrays and the target's lies
inside `stats` subtrees the Task declares training-time caches (`Task.resettable_stats`, passed here as an
`axlearn_like.state.ResettableState`; e.g. the EBT replay buffer, whose layout changed), the restore reads
every other array from the checkpoint (the target tree is the checkpoint's own, from its metadata; the
declared subtrees are never read), verifies their checksums, starts the declared subtrees from their initial
values and prints one note line naming them. Any other difference raises CheckpointMismatchError as above.

Restoring onto another process count: the model state restores onto any mesh (abstract targets). The data
iterator state of the map-style pipeline is the next *global* batch index, the same in every process file, so
it maps exactly onto any process count; any other saved state that cannot be mapped raises `DataStateError`
(one line) naming `--set checkpoint.restore_data=false` (model state only; the iterator restarts at the batch
derived from the step, which is exact for the map-style pipeline).
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp

from axlearn_like import config as config_lib
from axlearn_like.config import ConfigError, config_class, require

log = logging.getLogger("axlearn_like")


@config_class
class CheckpointConfig:
    every_steps: int = 100
    max_to_keep: int = 3  # keep the last N ...
    keep_period: int | None = None  # ... plus every K-th step forever
    async_save: bool = True
    enabled: bool = True
    restore_data: bool = True  # False: restore the model state only; the data iterator seeks to batch `step`

    def validate(self) -> None:
        require(self.every_steps >= 1, "checkpoint.every_steps", "must be >= 1")
        require(self.max_to_keep >= 1, "checkpoint.max_to_keep", "must be >= 1")
        require(self.keep_period is None or self.keep_period >= 1, "checkpoint.keep_period", "must be >= 1 or None")


class DataStateError(ConfigError):
    """The saved data iterator states cannot be mapped onto this run's processes (printed as one line)."""


_PORTABLE_KEYS = {"next_index"}  # grain map-style iterator: the next global batch index (process independent)


def _data_file(process_index: int, process_count: int) -> str:
    return f"process_{process_index}-of-{process_count}.json"  # grain.checkpoint.CheckpointHandler's naming


def mapped_data_state(directory: str, process_index: int, process_count: int) -> dict:
    """This process's iterator state from a checkpoint's `data` folder, saved by any number of processes.

    Same process count: this process's own file. Otherwise the states must be portable (all files equal,
    holding only the global batch index); anything else raises DataStateError.
    """
    own = os.path.join(directory, _data_file(process_index, process_count))
    if os.path.exists(own):
        with open(own) as f:
            return json.loads(f.read())
    listing = os.listdir(directory) if os.path.isdir(directory) else []
    names = sorted(n for n in listing if n.startswith("process_") and n.endswith(".json"))
    states = []
    for n in names:
        with open(os.path.join(directory, n)) as f:
            states.append(json.loads(f.read()))
    saved_by = names[0].split("-of-")[-1][:-5] if names else "0"
    if (states and all(s == states[0] for s in states) and isinstance(states[0], dict)
            and set(states[0]) <= _PORTABLE_KEYS):
        return states[0]
    step = os.path.basename(os.path.dirname(os.path.abspath(directory)))
    raise DataStateError(
        f"checkpoint step {step}: the data iterator state saved by {saved_by} process(es) cannot be mapped onto "
        f"{process_count} process(es) (per-process states differ); rerun with --set checkpoint.restore_data=false "
        f"to restore the model state and restart the data iterator at the batch of step {step}, "
        f"or use {saved_by} processes"
    )


def seek_to_step(iterator: Any, step: int) -> None:
    """Positions a map-style iterator at global batch `step` (one global batch per optimizer step)."""
    state = iterator.get_state()
    if not (isinstance(state, dict) and set(state) <= _PORTABLE_KEYS):
        raise DataStateError(f"checkpoint.restore_data=false needs a map-style data iterator (state {{next_index}}); "
                             f"this one has state keys "
                             f"{sorted(state) if isinstance(state, dict) else type(state).__name__}")
    iterator.set_state({"next_index": int(step)})


def _grain_handler():
    import grain

    return grain.checkpoint.CheckpointHandler()  # saves; restore reads the files itself (mapped_data_state)


class CheckpointMismatchError(ConfigError):
    """A checkpoint's arrays (tree, shapes, dtypes) differ from the state the config builds (one line)."""


class CorruptCheckpointError(ValueError):
    """A checkpoint step does not read back as saved (unreadable file, checksum mismatch); one line."""


def one_line(e: BaseException, limit: int = 200) -> str:
    """`Type: first line of the message` of the root cause (orbax wraps tensorstore's error, which names the
    damaged array, in one that prints pages of JSON specs), without tensorstore's source locations."""
    seen = {id(e)}
    while e.__cause__ is not None and id(e.__cause__) not in seen:  # orbax: raise Exception(...) from the real error
        e = e.__cause__
        seen.add(id(e))
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    first = re.sub(r"\s*\[source locations=.*$", "", first)
    first = re.sub(r' in OCDBT database at local file "[^"]*"', "", first)  # the step dir is in the message already
    return f"{type(e).__name__}: {first[:limit]}{'...' if len(first) > limit else ''}" if first else type(e).__name__


class _DropRecords(logging.Filter):
    def __init__(self, *needles: str):
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not any(n in msg for n in self.needles)


@contextlib.contextmanager
def dropping_log_records(logger_name: str, *needles: str):
    """Within the block, records of `logger_name` whose message contains one of `needles` are dropped."""
    logger, flt = logging.getLogger(logger_name), _DropRecords(*needles)
    logger.addFilter(flt)
    try:
        yield
    finally:
        logger.removeFilter(flt)


def quiet_asyncio_shutdown():
    """Drops asyncio's "unhandled exception during asyncio.run() shutdown" records: when orbax's restore fails,
    the reads it cancels may fail too, and asyncio logs each with a full TensorStore spec (thousands of lines).
    The restore's own error is reported as one line."""
    return dropping_log_records("asyncio", "during asyncio.run() shutdown")


def leaf_name(path) -> str:
    """A pytree key path -> dotted name as orbax writes it (`opt_state.1.0.mu.embed.embedding`)."""
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return ".".join(parts)


def signature(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) of every array leaf of a (possibly abstract) state."""
    return {leaf_name(p): (tuple(int(d) for d in x.shape), str(x.dtype))
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _metadata_tree(step_dir: str) -> Any:
    """A checkpoint step's `state` tree as saved, with orbax's array metadata as leaves (no array is read)."""
    from etils import epath

    with quiet_asyncio_shutdown():
        meta = ocp.StandardCheckpointHandler().metadata(epath.Path(step_dir) / "state")
    tree = getattr(meta, "item_metadata", meta)
    return getattr(tree, "tree", tree)


def saved_signature(step_dir: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) of a checkpoint step's `state` from its metadata (no array is read)."""
    try:
        leaves = jax.tree_util.tree_flatten_with_path(_metadata_tree(step_dir))[0]
        sig = {leaf_name(p): (tuple(int(d) for d in x.shape), str(x.dtype)) for p, x in leaves}
    except Exception as e:  # any unreadable or inconsistent metadata file
        raise CorruptCheckpointError(f"its state metadata is unreadable ({one_line(e)})") from None
    if not sig:
        raise CorruptCheckpointError("its state metadata lists no arrays")
    return sig


def _flat_config(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flat_config(v, f"{prefix}{k}."))
        return out
    if isinstance(d, list) and d and any(isinstance(v, (dict, list)) for v in d):
        out = {f"{prefix}len": len(d)}
        for i, v in enumerate(d):
            out.update(_flat_config(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: d}


def config_changes(saved: dict, current: dict, limit: int = 6) -> list[str]:
    """`key (saved -> now)` for config fields that differ; model and optimizer fields first."""
    a, b = _flat_config(saved), _flat_config(current)
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k != "run_dir"]
    keys.sort(key=lambda k: (not k.startswith(("model.", "optimizer.")), k))
    shown = [f"{k} ({a.get(k, '<absent>')} -> {b.get(k, '<absent>')})".replace("._type (", " (") for k in keys[:limit]]
    return shown + ([f"{len(keys) - limit} more"] if len(keys) > limit else [])


def _normalized_config(d: Any) -> Any:
    """A saved config dict as today's code writes it (legacy layouts migrate through from_dict)."""
    try:
        return config_lib.to_dict(config_lib.from_dict(d))
    except Exception:  # written by other code: compare the raw text
        return d


def check_fits(saved: dict, want: dict, *, where: str, saved_config: dict | None = None,
               config: dict | None = None, advice: str = "") -> None:
    """Raises CheckpointMismatchError naming the differing arrays and config fields unless saved == want."""
    if saved == want:
        return
    diffs = []
    for name in sorted(set(saved) | set(want), key=lambda n: (not n.startswith("params."), n)):
        s, w = saved.get(name), want.get(name)
        if s == w:
            continue
        fmt = lambda x: f"{x[1]}{list(x[0])}"
        diffs.append(f"{name} not in the checkpoint" if s is None else f"{name} only in the checkpoint" if w is None
                     else f"{name} saved {fmt(s)} vs {fmt(w)}")
    fields = ""
    if saved_config is not None and config is not None:
        changes = config_changes(_normalized_config(saved_config), config)
        fields = f"; config fields that differ from the checkpoint's: {', '.join(changes) if changes else 'none'}"
    raise CheckpointMismatchError(
        f"{where} does not fit this config: {len(diffs)} of {len(set(saved) | set(want))} arrays differ "
        f"({'; '.join(diffs[:3])}{'; ...' if len(diffs) > 3 else ''}){fields}{advice}")


def declared_differences(saved: dict, want: dict, resettable: Any) -> dict[str, list[str]]:
    """{declared subtree: its differing leaf names} when every leaf that differs between the signatures lies in
    a subtree `resettable` (an axlearn_like.state.ResettableState, or None) declares; else {} (no difference,
    or one that no declaration covers: check_fits names them all)."""
    differ = [n for n in sorted(set(saved) | set(want)) if saved.get(n) != want.get(n)]
    owners = [resettable.owner(n) if resettable is not None else None for n in differ]
    if not differ or None in owners:
        return {}
    out: dict[str, list[str]] = {}
    for n, o in zip(differ, owners):
        out.setdefault(o, []).append(n)
    return out


def _describe_reset(step: int, reset: dict[str, list[str]], saved: dict, resettable: Any) -> str:
    """The one note line of a restore that starts declared subtrees from their initial values."""
    some = lambda ns: f"{', '.join(ns[:3])}{', ...' if len(ns) > 3 else ''}"
    parts = []
    for prefix, names in reset.items():
        absent = [n for n in names if n not in saved]
        other = [n for n in names if n in saved]  # only in the checkpoint, or saved with another shape/dtype
        kinds = ([f"{len(absent)} arrays not in the checkpoint: {some(absent)}"] if absent else []) + (
            [f"{len(other)} arrays only in it or of another shape/dtype: {some(other)}"] if other else [])
        parts.append(f"{prefix} was saved in another layout ({'; '.join(kinds)}); {resettable.subtrees[prefix]}")
    return f"note: checkpoint step {step}: {'; '.join(parts)}"


def _restore_omitting(step_dir: str, abstract_state: Any, omit: Any) -> dict[str, Any]:
    """name -> array of every leaf of a step's `state` but those `omit(name)` selects (never read), each placed
    as abstract_state's leaf of that name. The restore's target tree is the checkpoint's own (its metadata),
    so arrays the current state lacks or holds in another layout, all omitted, need no target."""
    from etils import epath

    want = {leaf_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
    item = jax.tree_util.tree_map_with_path(
        lambda p, _: ocp.PLACEHOLDER if omit(leaf_name(p)) else want[leaf_name(p)], _metadata_tree(step_dir))
    args = jax.tree.map(lambda x: x if x is ocp.PLACEHOLDER else ocp.ArrayRestoreArgs(
        sharding=x.sharding, global_shape=x.shape, dtype=x.dtype), item)
    handler = ocp.PyTreeCheckpointHandler()
    try:
        with quiet_asyncio_shutdown():
            tree = handler.restore(epath.Path(step_dir) / "state",
                                   args=ocp.args.PyTreeRestore(item=item, restore_args=args))
    finally:
        handler.close()
    return {leaf_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0] if x is not ocp.PLACEHOLDER}


_CHECKSUM_SEEDS = (0x243F6A88, 0x85A308D3)
CHECKSUM_ALGORITHM = "axl-mix32x2-v1"


def _fmix32(h):
    """MurmurHash3's 32-bit finalizer (a bijection that spreads every input bit over the output)."""
    import jax.numpy as jnp

    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _array_checksum(x):
    """uint32[2]: sum_i mix(word_i ^ mix(i + seed)) mod 2^32 for two seeds, over the array's 32-bit words.

    A sum of per-element hashes keyed by the flat global index: any change of any bit (or a swap of two
    elements) changes it with probability ~1 - 2^-64, and integer sums wrap exactly, so the result is the
    same however the array is sharded (no gather: each device reduces its own shard).
    """
    import jax.numpy as jnp
    from jax import lax

    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        w = x.astype(jnp.uint32)
    elif x.dtype.itemsize == 8:
        w = lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
    else:
        u = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
        w = (x if x.dtype == u else lax.bitcast_convert_type(x, u)).astype(jnp.uint32)
    idx = jnp.zeros(w.shape, jnp.uint32)
    stride = 1
    for d in reversed(range(w.ndim)):
        idx = idx + lax.broadcasted_iota(jnp.uint32, w.shape, d) * jnp.uint32(stride % 2**32)
        stride *= w.shape[d]
    sums = []
    for seed in _CHECKSUM_SEEDS:
        h = _fmix32(w ^ _fmix32(idx * jnp.uint32(0x9E3779B9) + jnp.uint32(seed)))
        sums.append(jnp.sum(h, dtype=jnp.uint32))
    return jnp.stack(sums)


@functools.lru_cache(maxsize=8)
def _checksum_fn(mesh):
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    def fn(leaves):
        return jnp.stack([_array_checksum(x) for x in leaves]) if leaves else jnp.zeros((0, 2), jnp.uint32)

    return jax.jit(fn) if mesh is None else jax.jit(fn, out_shardings=NamedSharding(mesh, PartitionSpec()))


def state_checksums(state: Any) -> dict[str, str]:
    """name -> 16 hex digits per array leaf of a (sharded, multi-process) state; one fused device pass."""
    import numpy as np

    named = jax.tree_util.tree_flatten_with_path(state)[0]
    leaves = [x for _, x in named]
    mesh = next((x.sharding.mesh for x in leaves
                 if isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding)), None)
    sums = np.asarray(jax.device_get(_checksum_fn(mesh)(leaves)))
    return {leaf_name(p): f"{int(s[0]):08x}{int(s[1]):08x}" for (p, _), s in zip(named, sums)}


def _agree(ok: bool) -> bool:
    """True when `ok` holds on every process (a collective in multi-process jobs)."""
    if jax.process_count() == 1:
        return ok
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def _is_resource_error(e: BaseException) -> bool:
    """Out of memory is no proof of a damaged file: such a step is never moved aside."""
    return isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e)[:2000]


class Checkpointer:
    """ocp.CheckpointManager over our items: state, data, config, meta and checksums (one per array).

    `restore(step, ...)` returns exactly what was saved or raises: CheckpointMismatchError when the saved arrays'
    tree/shapes/dtypes differ from the target's (nothing is read), CorruptCheckpointError when a file does not
    read back or an array differs from the checksum saved with it. `restore_latest` moves a corrupt step aside
    (`<step>.corrupt-<UTC time>`, never deleted) and falls back to the previous one, so training saves that step
    number again; a read-only checkpointer (tools) only skips it. keep_all: never garbage-collect old steps.
    """

    def __init__(self, directory: str, cfg: CheckpointConfig, *, read_only: bool = False, keep_all: bool = False):
        self.directory = os.path.abspath(directory)
        self.restore_data = cfg.restore_data
        self.read_only = read_only
        options = ocp.CheckpointManagerOptions(  # read-only: the values orbax would otherwise warn it forces
            max_to_keep=None if keep_all or read_only else cfg.max_to_keep,
            keep_period=None if read_only else cfg.keep_period,
            save_interval_steps=0 if read_only else 1,
            enable_async_checkpointing=cfg.async_save,
            create=not read_only,
            read_only=read_only,
        )
        handlers = {
            "state": ocp.StandardCheckpointHandler(),
            "data": _grain_handler(),
            "config": ocp.JsonCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
            "checksums": ocp.JsonCheckpointHandler(),
        }
        with dropping_log_records("absl", "Given directory is read only"):  # tools: noise on every call
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, state: Any, iterator: Any, config_dict: dict, meta: dict, *, force: bool = False) -> bool:
        args = dict(
            state=ocp.args.StandardSave(state),
            config=ocp.args.JsonSave(config_dict),
            meta=ocp.args.JsonSave(meta),
            checksums=ocp.args.JsonSave({"algorithm": CHECKSUM_ALGORITHM, "arrays": state_checksums(state)}),
        )
        if iterator is not None:
            import grain

            args["data"] = grain.checkpoint.CheckpointSave(iterator)
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def restore(self, step: int, abstract_state: Any, iterator: Any = None, *, config_dict: dict | None = None,
                advice: str = "", resettable: Any = None) -> Any:
        """The state of `step` onto `abstract_state`'s shardings; positions `iterator` after it (see class doc).

        config_dict (the current config) names the config fields that differ in a mismatch error; `advice` ends it.
        resettable (axlearn_like.state.ResettableState, from state_setup.resettable_state): the subtrees that
        start from their initial values, with one note line, when all differences lie inside them (module doc).
        """
        where = f"checkpoint step {step} in {self.directory}"
        sdir = self.step_dir(step)
        err = None
        try:
            saved = saved_signature(sdir)
        except CorruptCheckpointError as e:
            err, saved = str(e), None
        if not _agree(err is None):
            raise CorruptCheckpointError(err or "another process could not read its state metadata")
        saved_config = None
        if config_dict is not None:
            try:
                saved_config = self.read_json(step, "config")
            except Exception:  # the message then names arrays only
                saved_config = None
        want = signature(abstract_state)
        reset = declared_differences(saved, want, resettable)
        if not reset:
            check_fits(saved, want, where=where, saved_config=saved_config, config=config_dict, advice=advice)
        omit = lambda name: resettable.owner(name) in reset  # the declared subtrees that differ: never read
        data_dir = os.path.join(sdir, "data")
        data_state = None
        if iterator is not None and self.restore_data and os.path.isdir(data_dir):
            # Read before any array, so every process fails fast with the same one-line error.
            try:
                data_state = mapped_data_state(data_dir, jax.process_index(), jax.process_count())
            except DataStateError:
                raise
            except (OSError, ValueError) as e:
                raise CorruptCheckpointError(f"its data iterator state is unreadable ({one_line(e)})") from None
        err = None
        try:
            if reset:  # name -> array of the rest, on the target shardings
                restored = _restore_omitting(sdir, abstract_state, omit)
            else:
                with quiet_asyncio_shutdown():
                    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
                    restored = self.manager.restore(step, args=args)["state"]
        except Exception as e:
            if _is_resource_error(e):
                raise
            err, restored = one_line(e), None
        if not _agree(err is None):
            raise CorruptCheckpointError(f"its arrays do not read back ({err or 'failed on another process'})")
        self._verify(step, restored, skip=omit if reset else None)
        if reset:
            leaves = {leaf_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
            leaves = {**restored, **resettable.init({n: x for n, x in leaves.items() if omit(n)})}
            restored = jax.tree_util.tree_map_with_path(lambda p, _: leaves[leaf_name(p)], abstract_state)
            if jax.process_index() == 0:
                print(_describe_reset(step, reset, saved, resettable), flush=True)
        if data_state is not None:
            iterator.set_state(data_state)
        elif iterator is not None:  # restore_data=false, or a checkpoint saved without data state
            seek_to_step(iterator, step)
        return restored

    def _verify(self, step: int, state: Any, skip: Any = None) -> None:
        """Every saved checksum (but of the names `skip` selects: not restored) against `state`'s arrays."""
        path = os.path.join(self.step_dir(step), "checksums", "metadata")
        if not os.path.exists(path):
            return  # saved before checksums were written
        try:
            with open(path) as f:
                saved = json.load(f)
            if saved.get("algorithm") != CHECKSUM_ALGORITHM:
                return  # written by another version of this code: nothing to compare against
            saved = dict(saved["arrays"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CorruptCheckpointError(f"its checksums file is unreadable ({one_line(e)})") from None
        now = state_checksums(state)
        bad = [n for n, c in saved.items() if not (skip is not None and skip(n)) and now.get(n) != c]
        if bad:
            raise CorruptCheckpointError(f"{len(bad)} array(s) differ from the checksums saved with them "
                                         f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")

    def restore_latest(self, abstract_state: Any, iterator: Any = None, *, config_dict: dict | None = None,
                       advice: str = "", resettable: Any = None) -> tuple[int | None, Any]:
        """Restores the newest step that reads back as saved; returns (step, state) or (None, None).

        A mismatching step raises (an older step would silently resume another run); a corrupt one is moved
        aside (read-only: skipped) and the previous one tried; when none is left this says "starting from scratch".
        resettable: as for `restore`.
        """
        steps = self.all_steps()
        for step in reversed(steps):
            try:
                return step, self.restore(step, abstract_state, iterator, config_dict=config_dict, advice=advice,
                                          resettable=resettable)
            except CorruptCheckpointError as e:
                self._set_aside(step, str(e))
        if steps:
            print(f"no checkpoint in {self.directory} could be restored ({len(steps)} unreadable, kept aside); "
                  f"starting from scratch", flush=True)
        return None, None

    def _set_aside(self, step: int, reason: str) -> None:
        where = f"checkpoint step {step} in {self.directory}"
        if self.read_only:
            print(f"warning: {where} is unreadable ({reason}); falling back to an earlier step", file=sys.stderr,
                  flush=True)
            return
        from axlearn_like.rundir import move_aside

        dest = move_aside(self.step_dir(step)) if jax.process_index() == 0 else None
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"axl_move_aside_{step}")
        self.manager.reload()
        if jax.process_index() == 0:
            log.warning("%s moved aside to %s: %s", where, dest, reason)
            print(f"warning: {where} is unreadable ({reason}); moved it to {os.path.basename(dest)} "
                  f"(kept, not deleted) "
                  f"and falling back to the previous step", flush=True)

    def read_json(self, step: int, item: str) -> dict:
        path = os.path.join(self.directory, str(step), item, "metadata")
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        restored = self.manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))
        return restored[item]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def read_step_config(ckpt: Checkpointer, step: int) -> Any:
    """The config saved with a step. A damaged file raises CorruptCheckpointError; one this code cannot rebuild
    (an unknown `_type`, an unknown key) raises ConfigError naming the file."""
    from axlearn_like import rundir

    path = os.path.join(ckpt.step_dir(step), "config", "metadata")
    try:
        with open(path) as f:
            text = f.read()
        json.loads(text)
    except (OSError, ValueError) as e:
        raise CorruptCheckpointError(f"its config {path} is unreadable ({one_line(e)})") from None
    return rundir.config_from_json_text(text, path)


def load(run_dir: str, step: int | None = None, *, mesh=None, masters: bool = False):
    """Research entry point: returns (task, variables, config) from any saved step, no data pipeline needed.

    variables = {'params', 'stats', 'carry'} unboxed, placed on the present devices with the config's
    sharding rules (or replicated on one device when the saved mesh does not fit). Runs with
    optimizer.param_dtype=bfloat16 store bf16 params (what the model computed with); masters=True returns the
    optimizer's float32 master weights as 'params' instead. step=None: the newest step that reads back as saved
    (a corrupt newer one is reported on stderr and skipped; nothing in the run dir is changed).
    """
    from axlearn_like.optimizers import master_weights
    from axlearn_like.state_setup import build_state_setup, resettable_state

    ckpt = Checkpointer(checkpoint_dir(run_dir), CheckpointConfig(), read_only=True)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise FileNotFoundError(
                f"no checkpoints under {checkpoint_dir(run_dir)}; train first or pass the right run dir")
        if step is not None and step not in steps:
            raise ValueError(f"step {step} is not saved in {run_dir}; saved steps: {steps}")
        reasons = []
        for s in [step] if step is not None else reversed(steps):
            try:
                cfg = read_step_config(ckpt, s)
                setup = build_state_setup(cfg, mesh=mesh, for_restore=True)
                state = ckpt.restore(s, setup.abstract_state, advice="; the saved config no longer builds the saved "
                                     "state (written by another version of this code?)",
                                     resettable=resettable_state(cfg, setup.task))
                break
            except CorruptCheckpointError as e:
                if step is not None:
                    raise ValueError(f"checkpoint step {s} in {ckpt.directory} is unreadable ({e}); "
                                     f"saved steps: {steps}; pick another step") from None
                ckpt._set_aside(s, str(e))
                reasons.append(f"step {s}: {e}")
        else:
            raise ValueError(f"no checkpoint in {ckpt.directory} can be read ({'; '.join(reasons[:3])})")
    finally:
        ckpt.close()
    master = master_weights(state.opt_state) if masters else None
    variables = {"params": state.params if master is None else master, "stats": state.stats, "carry": state.carry}
    return setup.task, variables, cfg
