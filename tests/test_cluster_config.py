"""ray_cluster.yaml, deploy/aws-cluster.cfn.yaml and deploy/kuberay-rayjob.yaml: valid for Ray, secure by the
rules of molre.cluster (token auth everywhere, no Ray port open to the internet, SSH from a configurable CIDR,
dashboard on 127.0.0.1, no usage stats, no secrets in files), and every rule proven live by breaking it."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import yaml

from molre import cli
from molre.cluster import (
    cfn_security_problems,
    check_file,
    kuberay_layout_problems,
    kuberay_security_problems,
    layout_problems,
    schema_problems,
    security_problems,
)

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "ray_cluster.yaml"
CFN = REPO / "deploy" / "aws-cluster.cfn.yaml"
KUBERAY = REPO / "deploy" / "kuberay-rayjob.yaml"
TOKEN_PATH = "/home/ray/.ray/auth_token"


@pytest.fixture
def cluster() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


@pytest.fixture
def cfn() -> dict:
    return yaml.safe_load(CFN.read_text())


@pytest.fixture
def kuberay() -> list[dict]:
    return list(yaml.safe_load_all(KUBERAY.read_text()))


def _start(commands: list[str]) -> str:
    return next(c for c in commands if "ray start" in c)


# ---- ray_cluster.yaml -------------------------------------------------------------------------------------


def test_cluster_yaml_passes_rays_own_schema(cluster):
    """What `ray up` runs before touching the cloud: defaults merged, then Ray's ray-schema.json + checks."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cluster)))
    assert schema_problems(cluster) == []
    # The validator is live: an unknown field in a node type is rejected by the same call.
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["gpu_1x_l40s"]["gpus"] = 1
    assert schema_problems(broken) and "gpus" in schema_problems(broken)[0]


def test_cluster_yaml_security_rules_hold(cluster):
    assert security_problems(cluster) == []
    run_options = " ".join(cluster["docker"]["run_options"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = _start(cluster[key])
        assert "RAY_AUTH_MODE=token" in start and f"RAY_AUTH_TOKEN_PATH={TOKEN_PATH}" in start
        assert "RAY_USAGE_STATS_ENABLED=0" in start
    assert "RAY_AUTH_MODE=token" in run_options and "RAY_USAGE_STATS_ENABLED=0" in run_options
    assert cluster["file_mounts"][TOKEN_PATH] == "~/.ray/auth_token"  # the token file, on every node
    assert "--dashboard-host=127.0.0.1" in _start(cluster["head_start_ray_commands"])
    for name, node_type in cluster["available_node_types"].items():
        assert node_type["node_config"]["SecurityGroupIds"], name  # never Ray's default (SSH from 0.0.0.0/0)
        assert "IamInstanceProfile" in node_type["node_config"], name  # S3 through a role, no keys
    text = json.dumps(cluster)
    assert "0.0.0.0/0" not in text and "::/0" not in text and "0.0.0.0" not in text
    assert not re.search(r"AKIA|aws_secret_access_key", text, re.IGNORECASE)


def test_cluster_yaml_layout(cluster):
    assert layout_problems(cluster, ray.__version__) == []
    assert cluster["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"] == {"CPU": 0} and "InstanceMarketOptions" not in head["node_config"]
    workers = {n: t for n, t in cluster["available_node_types"].items() if n != cluster["head_node_type"]}
    gpus = sorted(t["resources"]["GPU"] for t in workers.values())
    assert gpus[0] == 1 and gpus[-1] > 1  # a single-GPU and a multi-GPU type
    assert all(t["min_workers"] == 0 for t in workers.values())
    assert any(
        t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
        for t in workers.values()
    )
    assert cluster["idle_timeout_minutes"] > 0
    assert any("molre" in c and "pip install" in c for c in cluster["setup_commands"])


def _drop_env(
    cluster: dict, name: str, keys=("head_start_ray_commands", "worker_start_ray_commands")
) -> None:
    pattern = re.compile(rf"{name}=\S+\s*")
    cluster["docker"]["run_options"] = [o for o in cluster["docker"]["run_options"] if name not in o]
    for key in keys:
        cluster[key] = [pattern.sub("", c) for c in cluster[key]]


def _open(port: int, cidr: str = "0.0.0.0/0"):
    def mutate(c):
        ranges = {"Ipv6Ranges": [{"CidrIpv6": cidr}]} if ":" in cidr else {"IpRanges": [{"CidrIp": cidr}]}
        rule = {"IpProtocol": "tcp", "FromPort": port, "ToPort": port, **ranges}
        c["provider"]["security_group"] = {"GroupName": "molre-ray", "IpPermissions": [rule]}

    return mutate


def _set_start(key: str, old: str, new: str):
    def mutate(c):
        c[key] = [x.replace(old, new) for x in c[key]]

    return mutate


def _worker_without_token(c):
    c["docker"]["run_options"] = [o for o in c["docker"]["run_options"] if "RAY_AUTH_MODE" not in o]
    _drop_env(c, "RAY_AUTH_MODE", keys=("worker_start_ray_commands",))


def _no_security_group(c):
    del c["available_node_types"]["gpu_4x_l40s"]["node_config"]["SecurityGroupIds"]


BROKEN_CLUSTERS = {
    "dashboard port open to the world": (_open(8265), "0.0.0.0/0"),
    "GCS port open to the IPv6 world": (_open(6379, "::/0"), "::/0"),
    "client port open to a CIDR": (_open(10001, "198.51.100.0/24"), "only the cluster's own security group"),
    "SSH open to the world": (_open(22), "ports 22-22 open to 0.0.0.0/0"),
    "token auth dropped everywhere": (
        lambda c: _drop_env(c, "RAY_AUTH_MODE"),
        "head_start_ray_commands: Ray token authentication is off",
    ),
    "token auth dropped on workers": (
        _worker_without_token,
        "worker_start_ray_commands: Ray token authentication",
    ),
    "token auth disabled on the head": (
        _set_start("head_start_ray_commands", "RAY_AUTH_MODE=token", "RAY_AUTH_MODE=disabled"),
        "head_start_ray_commands: Ray token authentication is off",
    ),
    "token file not mounted": (lambda c: c["file_mounts"].pop(TOKEN_PATH), "is not in file_mounts"),
    "token literal in the config": (
        lambda c: c["docker"]["run_options"].append("--env RAY_AUTH_TOKEN=abc123"),
        "RAY_AUTH_TOKEN set in the config",
    ),
    "dashboard on every interface": (
        _set_start("head_start_ray_commands", "--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0"),
        "--dashboard-host=0.0.0.0",
    ),
    "usage stats on": (
        lambda c: (
            _drop_env(c, "RAY_USAGE_STATS_ENABLED"),
            _set_start("head_start_ray_commands", "--disable-usage-stats", "")(c),
        ),
        "head_start_ray_commands: usage stats are on",
    ),
    "node type without the cluster's security group": (_no_security_group, "opens SSH (22) to 0.0.0.0/0"),
    "AWS keys in the config": (
        lambda c: c["docker"]["run_options"].append("--env AWS_ACCESS_KEY_ID=AKIAABCDEFGHIJKLMNOP"),
        "AWS credentials in the config",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN_CLUSTERS))
def test_each_broken_security_rule_is_reported(cluster, case):
    mutate, expected = BROKEN_CLUSTERS[case]
    mutate(cluster)
    problems = security_problems(cluster)
    assert any(expected in p for p in problems), problems


BROKEN_LAYOUTS = {
    "spot head": (
        lambda c: c["available_node_types"]["ray.head.default"]["node_config"].update(
            InstanceMarketOptions={"MarketType": "spot"}
        ),
        "must be on-demand",
    ),
    "GPU workers not from zero": (
        lambda c: c["available_node_types"]["gpu_1x_l40s"].update(min_workers=1),
        "from 0",
    ),
    "unpinned image": (lambda c: c["docker"].update(image="rayproject/ray:latest-gpu"), "not pinned"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_LAYOUTS))
def test_each_broken_layout_rule_is_reported(cluster, case):
    mutate, expected = BROKEN_LAYOUTS[case]
    mutate(cluster)
    problems = layout_problems(cluster, ray.__version__)
    assert any(expected in p for p in problems), problems


_BOOTSTRAP = r"""
import copy, json, sys
import boto3, yaml
from moto import mock_aws
from ray.autoscaler._private.commands import _bootstrap_config

config = yaml.safe_load(open(sys.argv[1]))
with mock_aws():
    ec2 = boto3.client("ec2", region_name=config["provider"]["region"])
    vpc = ec2.describe_vpcs()["Vpcs"][0]["VpcId"]
    group = ec2.create_security_group(GroupName="molre-ray", Description="molre", VpcId=vpc)["GroupId"]
    ec2.authorize_security_group_ingress(GroupId=group, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "203.0.113.0/24"}]},
        {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": group}]}])
    iam = boto3.client("iam", region_name=config["provider"]["region"])
    for name in ("molre-ray-head", "molre-ray-worker"):
        iam.create_instance_profile(InstanceProfileName=name)

    def world_open(group_id):
        rules = ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"][0]["IpPermissions"]
        return sorted({r.get("FromPort", -1) for r in rules
                       if any(x["CidrIp"] == "0.0.0.0/0" for x in r.get("IpRanges", []))})

    ours = copy.deepcopy(config)
    for node_type in ours["available_node_types"].values():
        node_type["node_config"]["SecurityGroupIds"] = [group]  # the placeholder -> the stack's group
    resolved = _bootstrap_config(ours, no_config_cache=True)
    groups = {n: t["node_config"]["SecurityGroupIds"] for n, t in resolved["available_node_types"].items()}

    default = copy.deepcopy(config)
    for node_type in default["available_node_types"].values():
        del node_type["node_config"]["SecurityGroupIds"]
    resolved_default = _bootstrap_config(default, no_config_cache=True)
    default_group = resolved_default["available_node_types"]["ray.head.default"]["node_config"]["SecurityGroupIds"][0]
    print("RESULT " + json.dumps({"group": group, "groups": groups, "ours_world": world_open(group),
                                  "default_world": world_open(default_group)}))
"""


@pytest.mark.slow
def test_ray_up_bootstrap_keeps_our_security_group_and_the_default_would_open_ssh(tmp_path):
    """Ray's real AWS bootstrap (what `ray up` does before launching) against moto's EC2/IAM, in a subprocess
    (moto's in-process mock must not reset the session's S3 server): our explicit group goes through unchanged
    with nothing opened to the world; without SecurityGroupIds Ray's default group opens SSH to 0.0.0.0/0."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    env.update(
        HOME=str(tmp_path),  # Ray writes its generated SSH key to ~/.ssh
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_CONFIG_FILE="/nonexistent/aws-config",
        AWS_SHARED_CREDENTIALS_FILE="/nonexistent/aws-credentials",
    )
    done = subprocess.run(
        [sys.executable, "-c", _BOOTSTRAP, str(CLUSTER)], env=env, capture_output=True, text=True, timeout=300
    )
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert done.returncode == 0 and line, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(line.removeprefix("RESULT "))
    assert all(groups == [result["group"]] for groups in result["groups"].values())
    assert result["ours_world"] == []
    assert result["default_world"] == [22]


# ---- deploy/aws-cluster.cfn.yaml ---------------------------------------------------------------------------


def test_cfn_security_group_rules_hold(cfn):
    assert cfn_security_problems(cfn) == []
    ssh = cfn["Parameters"]["SshCidr"]
    assert ssh["Default"] == "203.0.113.0/24"  # a documentation range: reaches nobody until configured
    for cidr in ("203.0.113.0/24", "198.51.100.7/32", "10.0.0.0/8"):
        assert re.fullmatch(ssh["AllowedPattern"], cidr), cidr
    for cidr in ("0.0.0.0/0", "::/0", "0.0.0.0/1", "10.0.0.0/4"):
        assert not re.fullmatch(ssh["AllowedPattern"], cidr), cidr


def _cfn_group(t):
    return t["Resources"]["ClusterSecurityGroup"]["Properties"]["SecurityGroupIngress"]


def _world_ipv6(t):
    rule = t["Resources"]["IntraClusterIngress"]["Properties"]
    del rule["SourceSecurityGroupId"]
    rule["CidrIpv6"] = "::/0"


BROKEN_TEMPLATES = {
    "SSH default 0.0.0.0/0 and no pattern": (
        lambda t: (
            t["Parameters"]["SshCidr"].update(Default="0.0.0.0/0"),
            t["Parameters"]["SshCidr"].pop("AllowedPattern"),
        ),
        "open to 0.0.0.0/0",
    ),
    "SSH CIDR not configurable": (
        lambda t: _cfn_group(t)[0].update(CidrIp="198.51.100.7/32"),
        "configurable",
    ),
    "dashboard open to a CIDR": (
        lambda t: _cfn_group(t).append(
            {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "CidrIp": "0.0.0.0/0"}
        ),
        "a CIDR source on ports 8265-8265",
    ),
    "everything open over IPv6": (_world_ipv6, "open to ::/0"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_TEMPLATES))
def test_each_broken_template_rule_is_reported(cfn, case):
    mutate, expected = BROKEN_TEMPLATES[case]
    mutate(cfn)
    problems = cfn_security_problems(cfn)
    assert any(expected in p for p in problems), problems


# ---- deploy/kuberay-rayjob.yaml ----------------------------------------------------------------------------


def _rayjob(docs):
    return next(d for d in docs if d["kind"] == "RayJob")


def _ray_containers(docs):
    cluster = _rayjob(docs)["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_kuberay_manifest_rules_hold(kuberay):
    assert kuberay_security_problems(kuberay) == []
    assert kuberay_layout_problems(kuberay, ray.__version__) == []
    job = _rayjob(kuberay)
    assert "jobs/sweep.py" in job["spec"]["entrypoint"] and "--storage s3://" in job["spec"]["entrypoint"]
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert cluster["enableInTreeAutoscaling"] is True
    assert {g["minReplicas"] for g in cluster["workerGroupSpecs"]} == {0}
    assert any(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "4"
               for g in cluster["workerGroupSpecs"])  # fmt: skip
    for container in _ray_containers(kuberay):
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "molre-ray-token"
    text = KUBERAY.read_text()
    assert "LoadBalancer" not in re.sub(r"#.*", "", text) and "0.0.0.0" not in text


def _replace_env(container, name, entry=None):
    """Containers share one env list (a YAML anchor): give this one its own copy before changing it."""
    container["env"] = [e for e in container["env"] if e["name"] != name] + ([entry] if entry else [])


BROKEN_MANIFESTS = {
    "LoadBalancer head": (
        lambda d: _rayjob(d)["spec"]["rayClusterSpec"]["headGroupSpec"].update(serviceType="LoadBalancer"),
        "head serviceType LoadBalancer",
    ),
    "worker without token auth": (
        lambda d: _replace_env(_ray_containers(d)[-1], "RAY_AUTH_MODE"),
        "RAY_AUTH_MODE",
    ),
    "token literal": (
        lambda d: _replace_env(
            _ray_containers(d)[0], "RAY_AUTH_TOKEN", {"name": "RAY_AUTH_TOKEN", "value": "x"}
        ),
        "literal",
    ),
    "submitter without token": (
        lambda d: _replace_env(
            _rayjob(d)["spec"]["submitterPodTemplate"]["spec"]["containers"][0], "RAY_AUTH_TOKEN"
        ),
        "submitter",
    ),
    "extra LoadBalancer service": (
        lambda d: d.append(
            {"kind": "Service", "metadata": {"name": "dash"}, "spec": {"type": "LoadBalancer"}}
        ),
        "Service/dash",
    ),
    "no network policy": (
        lambda d: d.remove(next(x for x in d if x["kind"] == "NetworkPolicy")),
        "no NetworkPolicy selects",
    ),
    "network policy open to an ipBlock": (
        lambda d: next(x for x in d if x["kind"] == "NetworkPolicy")["spec"]["ingress"].append(
            {"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}
        ),
        "ipBlock",
    ),
    "token secret in the manifest": (
        lambda d: d.append({"kind": "Secret", "metadata": {"name": "t"}, "stringData": {"auth_token": "x"}}),
        "Secret/t",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN_MANIFESTS))
def test_each_broken_manifest_rule_is_reported(kuberay, case):
    mutate, expected = BROKEN_MANIFESTS[case]
    mutate(kuberay)
    problems = kuberay_security_problems(kuberay)
    assert any(expected in p for p in problems), problems


def test_kuberay_auth_options_replace_per_container_tokens(kuberay):
    """KubeRay >= 1.5.1 `authOptions: {mode: token}` injects the token itself: then no env is needed."""
    for container in _ray_containers(kuberay):
        container["env"] = [e for e in container["env"] if not e["name"].startswith("RAY_AUTH")]
    assert any("RAY_AUTH_MODE" in p for p in kuberay_security_problems(kuberay))
    _rayjob(kuberay)["spec"]["rayClusterSpec"]["authOptions"] = {"mode": "token"}
    assert kuberay_security_problems(kuberay) == []


# ---- the command ---------------------------------------------------------------------------------------------


def test_check_cluster_command(tmp_path, capsys, cluster):
    assert cli.main(["check-cluster", str(CLUSTER), str(CFN), str(KUBERAY)]) == 0
    assert capsys.readouterr().out.count(": ok") == 3
    _drop_env(cluster, "RAY_AUTH_MODE")
    bad = tmp_path / "open.yaml"
    bad.write_text(yaml.safe_dump(cluster))
    assert cli.main(["check-cluster", str(bad)]) == 1
    assert "token authentication is off" in capsys.readouterr().out
    assert check_file(bad, schema=False)  # the same problems, without Ray's schema pass


def test_runtime_env_file_keeps_uploads_small():
    env = yaml.safe_load((REPO / "deploy" / "runtime_env.yaml").read_text())
    assert ".git" in env["excludes"]
    assert all((REPO / module / "__init__.py").is_file() for module in env["py_modules"])
    assert "env_vars" not in env or not any("SECRET" in k for k in env["env_vars"])
