"""Fast in-process checks of the launch helpers and of mapping saved iterator states onto a process count."""
import json

import numpy as np
import pytest

from axlearn_like import checkpoint, launch
from axlearn_like.data import DataConfig, make_iterator


@pytest.mark.parametrize("env,want", [
    ({}, False),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, False),  # an sbatch script body, not inside srun
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "1", "SLURM_STEP_NODELIST": "n[1-2]",
      "SLURM_STEP_NUM_TASKS": "4"}, True),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_STEP_NODELIST": "n1",
      "SLURM_STEP_NUM_TASKS": "1"}, False),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, True),
    ({"OMPI_COMM_WORLD_SIZE": "1"}, False),
    ({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, True),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, False),
])
def test_in_cluster_detection(monkeypatch, env, want):
    for k in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_STEP_NODELIST", "SLURM_STEP_NUM_TASKS",
              "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert launch.in_cluster() is want


@pytest.mark.parametrize("args,match", [
    (("localhost:1234", 2, None), "pass all of"),
    (("localhost:1234", 2, 2), "must be in"),
    (("localhost", 2, 0), "HOST:PORT"),
])
def test_initialize_rejects_bad_flags(args, match):
    with pytest.raises(ValueError, match=match):
        launch.initialize(*args)


def test_initialize_is_a_no_op_for_one_plain_process(monkeypatch):
    for k in ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(k, raising=False)
    assert launch.initialize() is False


def _write(d, states: dict[tuple[int, int], dict]):
    d.mkdir(parents=True, exist_ok=True)
    for (i, n), s in states.items():
        (d / f"process_{i}-of-{n}.json").write_text(json.dumps(s))


def test_portable_state_maps_onto_any_process_count(tmp_path):
    d = tmp_path / "12" / "data"
    _write(d, {(0, 2): {"next_index": 12}, (1, 2): {"next_index": 12}})
    for i, n in [(0, 1), (0, 4), (3, 4), (1, 2)]:
        assert checkpoint.mapped_data_state(str(d), i, n) == {"next_index": 12}


def test_own_file_wins_and_unmappable_states_raise(tmp_path):
    d = tmp_path / "12" / "data"
    _write(d, {(0, 2): {"next_index": 12, "offset": 3}, (1, 2): {"next_index": 12, "offset": 9}})
    assert checkpoint.mapped_data_state(str(d), 1, 2) == {"next_index": 12, "offset": 9}
    with pytest.raises(checkpoint.DataStateError, match=r"step 12: .* 2 process\(es\) cannot be mapped onto 3 .*"
                                                        r"--set checkpoint.restore_data=false"):
        checkpoint.mapped_data_state(str(d), 0, 3)
    _write(d, {(0, 2): {"next_index": 12}, (1, 2): {"next_index": 13}})
    with pytest.raises(checkpoint.DataStateError, match="restore_data=false"):
        checkpoint.mapped_data_state(str(d), 0, 1)
    with pytest.raises(checkpoint.DataStateError):
        checkpoint.mapped_data_state(str(tmp_path / "missing"), 0, 1)


def test_iterator_state_is_process_count_independent_and_seekable():
    """The property the exact mapping relies on: state {next_index} counts global batches for every process
    count, and seek_to_step(step) lands on the batch a run that never stopped would read next."""
    cfg = DataConfig(max_bytes=100_000, seq_len=16, global_batch_size=8)
    its = [make_iterator(cfg, process_index=i, process_count=2) for i in range(2)]
    one = make_iterator(cfg)
    for _ in range(3):
        parts = [next(it) for it in its]
        whole = next(one)
        for k in whole:
            np.testing.assert_array_equal(whole[k], np.concatenate([p[k] for p in parts]))
    assert its[0].get_state() == its[1].get_state() == one.get_state()
    fresh = make_iterator(cfg, process_index=1, process_count=4)
    checkpoint.seek_to_step(fresh, 3)
    want = next(one)["inputs"][2:4]  # process 1 of 4 holds rows [2, 4)
    assert (next(fresh)["inputs"] == want).all()


def test_safetensors_names_round_trip_and_reject_dotted_keys():
    from tools.export_safetensors import flatten, unflatten

    tree = {"stack": {"block_0": {"kernel": np.arange(6.0).reshape(2, 3)}, "block_1": {"bias": np.ones(3)}}}
    flat = flatten(tree)
    assert sorted(flat) == ["stack.block_0.kernel", "stack.block_1.bias"]
    back = unflatten(flat)
    np.testing.assert_array_equal(back["stack"]["block_0"]["kernel"], tree["stack"]["block_0"]["kernel"])
    with pytest.raises(ValueError, match="contains '.'"):
        flatten({"stack": {"w.1": np.ones(1)}})
