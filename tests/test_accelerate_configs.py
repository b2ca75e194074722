"""The accelerate configs under configs/accelerate/ load through accelerate's own reader; the multi-node ones
name the rendezvous (main process address and port) and more than one machine."""

from __future__ import annotations

import pytest


def test_accelerate_configs_load_and_multinode_ones_name_the_rendezvous():
    pytest.importorskip("accelerate")
    from accelerate.commands.config.config_args import load_config_from_file

    from synthpert.resources import resource_dir

    files = sorted((resource_dir("configs") / "accelerate").glob("*.yaml"))
    assert len(files) >= 5
    for f in files:
        cfg = load_config_from_file(str(f))
        assert cfg.num_processes >= cfg.num_machines >= 1, f.name
        assert cfg.machine_rank == 0, f.name
        if "multinode" in f.name:
            assert cfg.num_machines > 1 and cfg.main_process_ip and cfg.main_process_port, f.name
            assert cfg.num_processes % cfg.num_machines == 0, f.name  # the same GPUs per node
            if cfg.distributed_type == "DEEPSPEED":
                assert cfg.deepspeed_config["deepspeed_multinode_launcher"] == "standard"
