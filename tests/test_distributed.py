"""Where the process group comes from: flags, JAXTRAIN_* variables, SLURM, TPU pods."""

import pytest

from conftest import TINY, cli_in_process
from jaxtrain.config.errors import UserError
from jaxtrain.run.distributed import ProcessGroup, resolve


def test_flags_win_over_the_environment():
    env = {"JAXTRAIN_COORDINATOR": "10.0.0.1:9", "JAXTRAIN_NUM_PROCESSES": "8", "JAXTRAIN_PROCESS_ID": "7"}
    assert resolve("127.0.0.1:1234", 2, 1, environ=env) == ProcessGroup("127.0.0.1:1234", 2, 1)
    assert resolve(environ=env) == ProcessGroup("10.0.0.1:9", 8, 7)


def test_one_process_or_nothing_given_is_a_single_process():
    assert resolve(environ={}) is None
    assert resolve("127.0.0.1:1", 1, 0, environ={}) is None
    assert resolve(environ={"SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"}) is None  # the batch script
    assert resolve(environ={"TPU_WORKER_HOSTNAMES": "localhost"}) is None  # a single-host TPU VM


def test_schedulers_are_detected():
    assert resolve(environ={"SLURM_STEP_NUM_TASKS": "16", "SLURM_PROCID": "3"}) == ProcessGroup(cluster="slurm")
    assert resolve(environ={"TPU_WORKER_HOSTNAMES": "t-w-0,t-w-1"}) == ProcessGroup(cluster="tpu pod")


@pytest.mark.parametrize("args, env, culprit", [
    (("127.0.0.1:1", 2, None), {}, "--process-id"),
    ((None, None, None), {"JAXTRAIN_NUM_PROCESSES": "two"}, "JAXTRAIN_NUM_PROCESSES"),
    (("127.0.0.1", 2, 0), {}, "--coordinator"),
    (("127.0.0.1:1", 2, 2), {}, "--process-id 2"),
    (("127.0.0.1:1", 0, 0), {}, "--num-processes 0"),
])
def test_incomplete_or_bad_settings_name_the_culprit(args, env, culprit):
    with pytest.raises(UserError, match=culprit):
        resolve(*args, environ=env)


def test_bad_flags_are_one_line_before_anything_starts(tmp_path, capsys):
    status, _, err = cli_in_process(capsys, "train", str(TINY), "--workdir", str(tmp_path / "w"),
                                    "--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "5")
    assert status == 2 and err == "jaxtrain: error: --process-id 5: must be in [0, 2)\n"
    assert not (tmp_path / "w").exists()
