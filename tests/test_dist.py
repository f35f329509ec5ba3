"""The environment of each launcher becomes rank, local rank, world size and master, or an error."""

from __future__ import annotations

import pytest

from bootmae_ds.runtime.dist import DistributedSetupError, first_host, resolve_env, slurm_port

DEEPSPEED = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "10.1.0.4", "MASTER_PORT": "29500",
             "CROSS_RANK": "0"}
TORCHRUN = {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
            "MASTER_ADDR": "gpu-01", "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "x"}
SRUN = {"SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2", "SLURM_NODEID": "1",
        "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu-[07-08]"}


def test_deepspeed_and_torchrun_environments() -> None:
    assert resolve_env(DEEPSPEED) == {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3",
                                      "MASTER_ADDR": "10.1.0.4", "MASTER_PORT": "29500"}
    assert resolve_env(TORCHRUN)["RANK"] == "5" and resolve_env(TORCHRUN)["LOCAL_RANK"] == "1"


def test_srun_tasks() -> None:
    out = resolve_env(SRUN)
    assert out == {"RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2", "MASTER_ADDR": "gpu-07",
                   "MASTER_PORT": str(20000 + 123456 % 20000)}
    exported = resolve_env({**SRUN, "MASTER_ADDR": "node9", "MASTER_PORT": "31000"})
    assert exported["MASTER_ADDR"] == "node9" and exported["MASTER_PORT"] == "31000"
    step_list = resolve_env({**SRUN, "SLURM_STEP_NODELIST": "node[3,5]"})
    assert step_list["MASTER_ADDR"] == "node3"


def test_plain_python_is_a_world_of_one() -> None:
    out = resolve_env({"PATH": "/bin"})
    assert (out["RANK"], out["WORLD_SIZE"], out["LOCAL_RANK"], out["MASTER_ADDR"]) == ("0", "1", "0", "127.0.0.1")
    assert 0 < int(out["MASTER_PORT"]) < 65536
    single_task = resolve_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "5"})
    assert single_task["WORLD_SIZE"] == "1"


@pytest.mark.parametrize("env,message", [
    ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR, MASTER_PORT missing"),
    ({"MASTER_ADDR": "x", "MASTER_PORT": "1"}, "RANK, WORLD_SIZE missing"),
    ({**DEEPSPEED, "RANK": "8"}, "RANK=8 / LOCAL_RANK=3 do not fit WORLD_SIZE=8"),
    ({k: v for k, v in SRUN.items() if k != "SLURM_STEP_ID"}, "not in an srun step"),
    ({k: v for k, v in SRUN.items() if k != "SLURM_JOB_NODELIST"}, "cannot find the master"),
    ({k: v for k, v in SRUN.items() if k != "SLURM_JOB_ID"}, "cannot choose a port"),
])
def test_incomplete_environments_raise(env, message) -> None:
    with pytest.raises(DistributedSetupError, match=message):
        resolve_env(env)


@pytest.mark.parametrize("nodelist,host", [
    ("node1", "node1"), ("node[1-2]", "node1"), ("gpu-[07-09,12],cpu1", "gpu-07"),
    ("a1,b[2-3]", "a1"), ("rack[3]-gpu", "rack3-gpu"), ("n[010-011]", "n010"),
])
def test_first_host(nodelist, host) -> None:
    assert first_host(nodelist) == host


def test_ports_differ_between_jobs() -> None:
    assert slurm_port("1") != slurm_port("2") and 20000 <= slurm_port("987654") < 40000
