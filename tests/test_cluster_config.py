"""ray_cluster.yaml is a cluster-launcher file Ray itself accepts."""

from __future__ import annotations

from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config  # what `ray up` runs first

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_file_passes_rays_own_validation():
    config = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    validate_config(prepare_config(config))
    workers = config["available_node_types"]
    assert config["head_node_type"] in workers
    assert any("g5" in node["node_config"]["InstanceType"] for node in workers.values()), "a GPU worker type"
    assert any("pip install -e \"$HOME/fiberlake[s3]\"" in cmd for cmd in config["setup_commands"])
