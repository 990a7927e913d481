"""Checkpointer.restore's migration on read of declared caches (axlearn_like.state.ResettableState): when the
only differences between a checkpoint and the target lie in subtrees declared resettable, everything else is
read (and checksum-verified), the declared subtrees start from their initial values, and one note line says
so; any other difference is still the one-line CheckpointMismatchError. Toy states, no model: the EBT's use of
it on a real old run dir is in tests/models/test_legacy_runs.py."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from axlearn_like import checkpoint
from axlearn_like.state import ResettableState

MESH = Mesh(np.array(jax.devices()), ("data",))
SHARDED, REPLICATED = NamedSharding(MESH, P("data")), NamedSharding(MESH, P())
WHY = "a toy cache, not model state: starting it at 7"


def _old_state():
    """The layout of 'older code': its cache holds `logits` and `count` only."""
    return {"params": {"w": jnp.arange(32.0).reshape(8, 4), "b": jnp.ones((3,), jnp.bfloat16)},
            "stats": {"cache": {"logits": jnp.full((2, 5), 3.0), "count": jnp.asarray(9, jnp.int32)},
                      "bias": jnp.asarray([1.5, -2.0])}}


def _target(w_rows=8):
    """Today's layout: the cache gained `rows`; w sharded over 8 devices."""
    sds = jax.ShapeDtypeStruct
    return {"params": {"w": sds((w_rows, 4), jnp.float32, sharding=SHARDED),
                       "b": sds((3,), jnp.bfloat16, sharding=REPLICATED)},
            "stats": {"cache": {"logits": sds((2, 5), jnp.float32, sharding=REPLICATED),
                                "count": sds((), jnp.int32, sharding=REPLICATED),
                                "rows": sds((2, 5), jnp.int32, sharding=REPLICATED)},
                      "bias": sds((2,), jnp.float32, sharding=REPLICATED)}}


def _resettable(calls):
    def init(wanted):
        calls.append(sorted(wanted))
        return {n: jax.device_put(jnp.full(x.shape, 7, x.dtype), x.sharding) for n, x in wanted.items()}

    return ResettableState({"stats.cache": WHY}, init)


@pytest.fixture()
def saved(tmp_path):
    ck = checkpoint.Checkpointer(str(tmp_path), checkpoint.CheckpointConfig(async_save=False))
    ck.save(1, _old_state(), None, {}, {}, force=True)
    ck.wait()
    yield ck
    ck.close()


def test_declared_cache_starts_from_init_and_the_rest_is_restored(saved, capsys):
    calls = []
    state = saved.restore(1, _target(), resettable=_resettable(calls))
    old = _old_state()
    for k in ("w", "b"):
        assert state["params"][k].dtype == old["params"][k].dtype
        np.testing.assert_array_equal(np.asarray(state["params"][k]), np.asarray(old["params"][k]))
    assert state["params"]["w"].sharding == SHARDED  # placed as the target says
    np.testing.assert_array_equal(np.asarray(state["stats"]["bias"]), [1.5, -2.0])  # undeclared stats: restored
    assert calls == [["stats.cache.count", "stats.cache.logits", "stats.cache.rows"]]  # the whole subtree, once
    for k in ("logits", "count", "rows"):
        assert np.all(np.asarray(state["stats"]["cache"][k]) == 7), k
    out = capsys.readouterr().out.strip()
    assert out == ("note: checkpoint step 1: stats.cache was saved in another layout (1 arrays not in the checkpoint: "
                   f"stats.cache.rows); {WHY}"), out


def test_an_undeclared_difference_still_raises_one_line(saved, capsys):
    calls = []
    with pytest.raises(checkpoint.CheckpointMismatchError) as e:
        saved.restore(1, _target(w_rows=16), resettable=_resettable(calls))  # params.w changed, cache too
    msg = str(e.value)
    assert "\n" not in msg and "2 of 6 arrays differ" in msg and "params.w saved float32[8, 4] vs float32[16, 4]" in msg
    assert calls == [] and capsys.readouterr().out == ""
    with pytest.raises(checkpoint.CheckpointMismatchError):  # no declaration: any difference raises
        saved.restore(1, _target())


def test_checksums_are_verified_for_what_was_restored(saved):
    path = os.path.join(saved.step_dir(1), "checksums", "metadata")
    with open(path) as f:
        sums = json.load(f)
    # The omitted (never read) cache arrays' checksums are not compared ...
    sums["arrays"]["stats.cache.logits"] = "0" * 16
    with open(path, "w") as f:
        json.dump(sums, f)
    saved.restore(1, _target(), resettable=_resettable([]))
    # ... every restored array's is.
    sums["arrays"]["stats.bias"] = "0" * 16
    with open(path, "w") as f:
        json.dump(sums, f)
    with pytest.raises(checkpoint.CorruptCheckpointError) as e:
        saved.restore(1, _target(), resettable=_resettable([]))
    assert "1 array(s) differ from the checksums saved with them (stats.bias)" in str(e.value)
