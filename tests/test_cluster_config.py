"""ray_cluster.yaml, deploy/aws-cluster.cfn.yaml, deploy/kuberay-rayjob.yaml and the GPU sweeps: valid for Ray,
secure by the rules of molre.cluster (token auth everywhere, no Ray port open to the internet, SSH from a
configurable CIDR, dashboard on 127.0.0.1 or behind a NetworkPolicy, no usage stats, no secrets in files), sweeps
that use the GPUs of a cluster that scales from zero, and every rule proven live by breaking it."""

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
    cluster_node_types,
    cross_problems,
    irsa_problems,
    kuberay_layout_problems,
    kuberay_node_types,
    kuberay_security_problems,
    layout_problems,
    schema_problems,
    security_problems,
    sweep_problems,
)

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "ray_cluster.yaml"
CFN = REPO / "deploy" / "aws-cluster.cfn.yaml"
KUBERAY = REPO / "deploy" / "kuberay-rayjob.yaml"
TOKEN_PATH = "/home/ray/.ray/auth_token"
SPACES = REPO / "search_spaces"
# The sweeps docs/cluster.md runs on the GPU cluster (their data is on S3).
GPU_SWEEPS = sorted(
    p
    for p in SPACES.glob("*.yaml")
    if str(((yaml.safe_load(p.read_text()).get("base") or {}).get("data") or {}).get("uri", "")).startswith(
        "s3://"
    )
)


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


def _auth_only_on_an_earlier_command(c):
    """Each launcher command is its own shell: an `export` before `ray stop` is gone when `ray start` runs."""
    _drop_env(c, "RAY_AUTH_MODE")
    _drop_env(c, "RAY_AUTH_TOKEN_PATH")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        c[key] = [
            f"export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={TOKEN_PATH}; {x}" if x == "ray stop" else x
            for x in c[key]
        ]


def _token_from_the_checkout(c):
    c["file_mounts"][TOKEN_PATH] = "./auth_token"


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
    "token auth only on the `ray stop` command": (
        _auth_only_on_an_earlier_command,
        "worker_start_ray_commands: Ray token authentication is off",
    ),
    "auth mode as a docker label, not an env": (
        lambda c: (
            _drop_env(c, "RAY_AUTH_MODE"),
            c["docker"]["run_options"].append("--label RAY_AUTH_MODE=token"),
        ),
        "head_start_ray_commands: Ray token authentication is off",
    ),
    "auth mode set after ray start": (
        lambda c: (
            _drop_env(c, "RAY_AUTH_MODE"),
            _set_start(
                "head_start_ray_commands",
                "--disable-usage-stats",
                "--disable-usage-stats; RAY_AUTH_MODE=token",
            )(c),
        ),
        "head_start_ray_commands: Ray token authentication is off",
    ),
    "token file mounted from the checkout": (_token_from_the_checkout, "inside the checkout"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_CLUSTERS))
def test_each_broken_security_rule_is_reported(cluster, case):
    mutate, expected = BROKEN_CLUSTERS[case]
    mutate(cluster)
    problems = security_problems(cluster)
    assert any(expected in p for p in problems), problems


def _env_in_docker_only(option_for):
    def mutate(c):
        for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
            _drop_env(c, name)
        c["docker"]["run_options"] += [
            option_for("RAY_AUTH_MODE", "token"),
            option_for("RAY_AUTH_TOKEN_PATH", TOKEN_PATH),
        ]

    return mutate


@pytest.mark.parametrize(
    "form",
    [
        lambda name, value: f'--env "{name}={value}"',
        lambda name, value: f"--env '{name}={value}'",
        lambda name, value: f"-e {name}={value}",
        lambda name, value: f"--env={name}={value}",
    ],
    ids=["double-quoted", "single-quoted", "-e", "--env="],
)
def test_docker_env_forms_count_as_set(cluster, form):
    """`--env "RAY_AUTH_MODE=token"` is what docker sees as RAY_AUTH_MODE=token: not a broken rule."""
    _env_in_docker_only(form)(cluster)
    assert not any("RAY_AUTH_MODE" in c for k in ("head_start_ray_commands", "worker_start_ray_commands")
                   for c in cluster[k])  # fmt: skip
    assert security_problems(cluster) == []


def test_exports_in_the_start_command_itself_count(cluster):
    _drop_env(cluster, "RAY_AUTH_MODE")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        cluster[key] = [
            f"export RAY_AUTH_MODE='token' && {x}" if "ray start" in x else x for x in cluster[key]
        ]
    assert security_problems(cluster) == []


def test_token_file_under_the_checkout_is_refused(cluster, tmp_path):
    """Absolute paths count too, when they are inside the repository the config belongs to."""
    assert security_problems(cluster, checkout=REPO) == []
    cluster["file_mounts"][TOKEN_PATH] = str(REPO / "deploy" / "auth_token")
    assert any("inside the checkout" in p for p in security_problems(cluster, checkout=REPO))
    cluster["file_mounts"][TOKEN_PATH] = str(tmp_path / "auth_token")  # elsewhere: fine
    assert security_problems(cluster, checkout=REPO) == []


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


def _policy(docs):
    return next(d for d in docs if d["kind"] == "NetworkPolicy")


def _groups(docs):
    cluster = _rayjob(docs)["spec"]["rayClusterSpec"]
    return [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]


def _ray_containers(docs):
    return [c for g in _groups(docs) for c in g["template"]["spec"]["containers"]]


def _submitter(docs):
    return _rayjob(docs)["spec"]["submitterPodTemplate"]["spec"]["containers"][0]


def test_kuberay_manifest_rules_hold(kuberay):
    assert kuberay_security_problems(kuberay) == []
    assert kuberay_layout_problems(kuberay, ray.__version__, REPO) == []
    job = _rayjob(kuberay)
    assert "jobs/sweep.py" in job["spec"]["entrypoint"] and "--storage s3://" in job["spec"]["entrypoint"]
    config = re.search(r"--config (\S+)", job["spec"]["entrypoint"]).group(1)
    assert (REPO / config).is_file() and REPO / config in GPU_SWEEPS  # a real, GPU-ready sweep
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert cluster["enableInTreeAutoscaling"] is True
    # token auth managed by the operator: Ray containers, autoscaler sidecar, submitter and the operator itself
    assert cluster["authOptions"] == {"mode": "token"}
    assert {g["minReplicas"] for g in cluster["workerGroupSpecs"]} == {0}
    assert any(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "4"
               for g in cluster["workerGroupSpecs"])  # fmt: skip
    for container in [*_ray_containers(kuberay), _submitter(kuberay)]:
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"  # fails closed on an operator without authOptions
        assert "RAY_AUTH_TOKEN" not in env  # the operator's generated Secret, not one of ours
    # every Ray pod has its object store in a memory-backed /dev/shm of bounded size
    for group in _groups(kuberay):
        spec = group["template"]["spec"]
        mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["mountPath"] == "/dev/shm")
        volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
        assert volume["emptyDir"]["medium"] == "Memory" and volume["emptyDir"]["sizeLimit"]
    # the 1-GPU group fits a 4-vCPU node's allocatable CPU (~3.9 minus DaemonSets)
    assert kuberay_node_types(kuberay)["gpu-1x"]["CPU"] <= 3
    text = KUBERAY.read_text()
    assert "LoadBalancer" not in re.sub(r"#.*", "", text) and "0.0.0.0" not in re.sub(r"#.*", "", text)
    assert (
        "dashboard-host" not in cluster["headGroupSpec"]["rayStartParams"]
    )  # KubeRay's default: see SECURITY.md


def _replace_env(container, name, entry=None):
    """Containers share one env list (a YAML anchor): give this one its own copy before changing it."""
    container["env"] = [e for e in container["env"] if e["name"] != name] + ([entry] if entry else [])


TOKEN_FROM_SECRET = {
    "name": "RAY_AUTH_TOKEN",
    "valueFrom": {"secretKeyRef": {"name": "t", "key": "auth_token"}},
}


def _hand_made_auth(docs):
    """The pre-authOptions way: RAY_AUTH_MODE + RAY_AUTH_TOKEN from a Secret on every container, by hand."""
    cluster = _rayjob(docs)["spec"]["rayClusterSpec"]
    del cluster["authOptions"]
    for container in [*_ray_containers(docs), _submitter(docs)]:
        _replace_env(container, "RAY_AUTH_TOKEN", TOKEN_FROM_SECRET)
    cluster["autoscalerOptions"]["env"] = [{"name": "RAY_AUTH_MODE", "value": "token"}, TOKEN_FROM_SECRET]


def _without_operator_rule(docs):
    _policy(docs)["spec"]["ingress"] = [
        r for r in _policy(docs)["spec"]["ingress"] if "namespaceSelector" not in r["from"][0]
    ]


def _operator_rule(docs):
    return next(r for r in _policy(docs)["spec"]["ingress"] if "namespaceSelector" in r["from"][0])


BROKEN_MANIFESTS = {
    "LoadBalancer head": (
        lambda d: _rayjob(d)["spec"]["rayClusterSpec"]["headGroupSpec"].update(serviceType="LoadBalancer"),
        "head serviceType LoadBalancer",
    ),
    "no authOptions and no token on the containers": (
        lambda d: _rayjob(d)["spec"]["rayClusterSpec"].pop("authOptions"),
        "no RAY_AUTH_TOKEN from a Secret",
    ),
    "hand-made auth: worker without RAY_AUTH_MODE": (
        lambda d: (_hand_made_auth(d), _replace_env(_ray_containers(d)[-1], "RAY_AUTH_MODE")),
        "RAY_AUTH_MODE",
    ),
    "hand-made auth: submitter without token": (
        lambda d: (_hand_made_auth(d), _replace_env(_submitter(d), "RAY_AUTH_TOKEN")),
        "submitter",
    ),
    "hand-made auth: autoscaler sidecar without token": (
        lambda d: (_hand_made_auth(d), _rayjob(d)["spec"]["rayClusterSpec"]["autoscalerOptions"].pop("env")),
        "autoscalerOptions.env: RAY_AUTH_MODE is not 'token'",
    ),
    "hand-made auth: the operator has no token": (_hand_made_auth, "sends the token only with authOptions"),
    "token literal": (
        lambda d: _replace_env(
            _ray_containers(d)[0], "RAY_AUTH_TOKEN", {"name": "RAY_AUTH_TOKEN", "value": "x"}
        ),
        "literal",
    ),
    "token literal for the autoscaler": (
        lambda d: _rayjob(d)["spec"]["rayClusterSpec"]["autoscalerOptions"].update(
            env=[{"name": "RAY_AUTH_TOKEN", "value": "x"}]
        ),
        "autoscalerOptions.env: RAY_AUTH_TOKEN is a literal",
    ),
    "extra LoadBalancer service": (
        lambda d: d.append(
            {"kind": "Service", "metadata": {"name": "dash"}, "spec": {"type": "LoadBalancer"}}
        ),
        "Service/dash",
    ),
    "no network policy": (lambda d: d.remove(_policy(d)), "no NetworkPolicy selects"),
    "network policy open to an ipBlock": (
        lambda d: _policy(d)["spec"]["ingress"].append({"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}),
        "ipBlock",
    ),
    "network policy open to whole namespaces": (
        lambda d: _operator_rule(d)["from"][0].pop("podSelector"),
        "every pod of the selected namespaces",
    ),
    "operator not admitted to the dashboard port": (_without_operator_rule, "admits the KubeRay operator"),
    "operator admitted on the wrong port": (
        lambda d: _operator_rule(d).update(ports=[{"protocol": "TCP", "port": 6379}]),
        "admits the KubeRay operator",
    ),
    "operator selector without a namespace (matches only this namespace)": (
        lambda d: _operator_rule(d)["from"][0].pop("namespaceSelector"),
        "admits the KubeRay operator",
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


def test_hand_made_token_auth_is_complete_but_the_operator_cannot_use_it(kuberay):
    """Without authOptions every container, the submitter and the autoscaler need the token by hand, and even
    then the RayJob fails: the operator talks to the head's job API and has no token (only authOptions gives
    it one)."""
    _hand_made_auth(kuberay)
    problems = kuberay_security_problems(kuberay)
    assert len(problems) == 1 and "sends the token only with authOptions" in problems[0], problems
    # with authOptions the per-container tokens are not needed
    for container in [*_ray_containers(kuberay), _submitter(kuberay)]:
        container["env"] = [e for e in container["env"] if not e["name"].startswith("RAY_AUTH")]
    del _rayjob(kuberay)["spec"]["rayClusterSpec"]["autoscalerOptions"]["env"]
    _rayjob(kuberay)["spec"]["rayClusterSpec"]["authOptions"] = {"mode": "token"}
    assert kuberay_security_problems(kuberay) == []


BROKEN_KUBERAY_LAYOUTS = {
    "entrypoint config that does not exist": (
        lambda d: _rayjob(d)["spec"].update(
            entrypoint="python jobs/sweep.py --config search_spaces/sweep.yaml --storage s3://b/m"
        ),
        "--config search_spaces/sweep.yaml is not in the repository",
    ),
    "dashboard on the head's loopback only": (
        lambda d: _rayjob(d)["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].update(
            {"dashboard-host": "127.0.0.1"}
        ),
        "hides the job API from the head Service",
    ),
    "GPU group not from zero": (
        lambda d: _rayjob(d)["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(minReplicas=1),
        "minReplicas must be 0",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN_KUBERAY_LAYOUTS))
def test_each_broken_kuberay_layout_is_reported(kuberay, case):
    mutate, expected = BROKEN_KUBERAY_LAYOUTS[case]
    mutate(kuberay)
    problems = kuberay_layout_problems(kuberay, ray.__version__, REPO)
    assert any(expected in p for p in problems), problems


# ---- the pods' IAM role (IRSA) ------------------------------------------------------------------------------


def test_pods_assume_their_own_role_through_the_eks_oidc_provider(kuberay, cfn):
    assert irsa_problems(kuberay, cfn) == []
    account = next(d for d in kuberay if d["kind"] == "ServiceAccount")
    role_name = account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].rsplit("/", 1)[-1]
    role = next(
        r
        for r in cfn["Resources"].values()
        if r["Type"] == "AWS::IAM::Role" and r["Properties"]["RoleName"] == role_name
    )
    assert role["Properties"]["ManagedPolicyArns"] == [{"Ref": "BucketAccess"}]  # the workers' bucket access
    trust = role["Properties"]["AssumeRolePolicyDocument"]["Fn::Sub"]
    values = {"AWS::Partition": "aws", "AWS::AccountId": "123456789012", "PodNamespace": "default",
              "EksOidcProvider": "oidc.eks.us-east-1.amazonaws.com/id/ABC"}  # fmt: skip
    document = json.loads(re.sub(r"\$\{([^}]+)\}", lambda m: values[m.group(1)], trust))
    (statement,) = document["Statement"]
    assert statement["Action"] == "sts:AssumeRoleWithWebIdentity"
    assert statement["Principal"]["Federated"].endswith(
        ":oidc-provider/oidc.eks.us-east-1.amazonaws.com/id/ABC"
    )
    assert statement["Condition"]["StringEquals"] == {
        "oidc.eks.us-east-1.amazonaws.com/id/ABC:aud": "sts.amazonaws.com",
        "oidc.eks.us-east-1.amazonaws.com/id/ABC:sub": f"system:serviceaccount:default:{account['metadata']['name']}",
    }
    pattern = cfn["Parameters"]["EksOidcProvider"]["AllowedPattern"]
    assert re.fullmatch(pattern, "") and re.fullmatch(pattern, "oidc.eks.eu-west-1.amazonaws.com/id/0A1B2C")
    assert not re.fullmatch(pattern, "https://oidc.eks.eu-west-1.amazonaws.com/id/0A1B2C")


def test_a_pod_role_that_pods_cannot_assume_is_reported(kuberay, cfn):
    account = next(d for d in kuberay if d["kind"] == "ServiceAccount")
    account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] = (
        "arn:aws:iam::123456789012:role/molre-ray-worker"
    )
    assert any("does not trust this ServiceAccount" in p for p in irsa_problems(kuberay, cfn))
    account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] = "arn:aws:iam::123456789012:role/nope"
    assert any("is not a role of the CloudFormation template" in p for p in irsa_problems(kuberay, cfn))


# ---- GPU sweeps on the autoscaling clusters ------------------------------------------------------------------


def test_the_gpu_sweeps_are_the_ones_docs_run_on_the_cluster():
    assert {p.stem for p in GPU_SWEEPS} == {"paper_table2", "molre_hparams", "placement"}
    docs = (REPO / "docs" / "cluster.md").read_text()
    assert all(p.stem in docs for p in GPU_SWEEPS)


@pytest.mark.parametrize("path", GPU_SWEEPS, ids=lambda p: p.stem)
def test_gpu_sweeps_use_the_gpus_of_both_clusters(path, cluster, kuberay):
    """use_gpu true, a concurrency cap, and a trial that fits the 1-GPU node type of ray_cluster.yaml and of the
    KubeRay manifest (else only the 4-GPU type would ever launch)."""
    from molre.tune.space import load_sweep, run_config_for

    sweep = yaml.safe_load(path.read_text())
    assert sweep_problems(sweep) == []
    for node_types in (cluster_node_types(cluster), kuberay_node_types(kuberay)):
        assert sweep_problems(sweep, node_types) == []
    spec = load_sweep(path)  # still a valid sweep, and it resolves to GPUs without asking the cluster
    assert run_config_for(spec, {}).scaling.use_gpu is True and spec.resources.max_concurrent_trials


def _sweep(**resources):
    sweep = yaml.safe_load((SPACES / "paper_table2.yaml").read_text())
    sweep["resources"].update(resources)
    return sweep


BROKEN_SWEEPS = {
    "use_gpu auto": (
        lambda: {**_sweep(), "base": {**_sweep()["base"], "scaling": {"use_gpu": "auto"}}},
        "ray_cluster",
        "base.scaling.use_gpu is 'auto'",
    ),
    "no concurrency cap": (
        lambda: {**_sweep(), "resources": {"num_workers": 1, "gpus_per_worker": 1, "cpus_per_worker": 2}},
        "ray_cluster",
        "max_concurrent_trials is not set",
    ),
    "8 CPUs per worker on ray_cluster.yaml": (
        lambda: _sweep(cpus_per_worker=8),
        "ray_cluster",
        "more than node type gpu_1x_l40s has (4)",
    ),
    "8 CPUs per worker on the spot type too": (
        lambda: _sweep(cpus_per_worker=8),
        "ray_cluster",
        "more than node type gpu_1x_l40s_spot has (4)",
    ),
    "3 CPUs per worker on KubeRay's 3-CPU gpu-1x pod (no CPU left for data reads)": (
        lambda: _sweep(cpus_per_worker=3),
        "kuberay",
        "more than node type gpu-1x has (3)",
    ),
    "more concurrent trials than GPUs": (
        lambda: _sweep(max_concurrent_trials=100),
        "ray_cluster",
        "more than the cluster's",
    ),
    "a trial bigger than any node": (
        lambda: _sweep(num_workers=8),
        "kuberay",
        "no worker node type has that many",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN_SWEEPS))
def test_each_broken_sweep_rule_is_reported(cluster, kuberay, case):
    make, target, expected = BROKEN_SWEEPS[case]
    node_types = cluster_node_types(cluster) if target == "ray_cluster" else kuberay_node_types(kuberay)
    problems = sweep_problems(make(), node_types)
    assert any(expected in p for p in problems), problems


def test_the_4_gpu_ddp_layout_of_the_docs_fits_only_the_4_gpu_types(cluster, kuberay):
    """docs/cluster.md's DDP row: 4 workers x 1 GPU x 8 CPUs is meant for gpu_4x_l40s; not a problem."""
    sweep = _sweep(num_workers=4, cpus_per_worker=8, max_concurrent_trials=2)
    assert sweep_problems(sweep, cluster_node_types(cluster)) == []
    assert sweep_problems(sweep, kuberay_node_types(kuberay)) == []


# ---- the command ---------------------------------------------------------------------------------------------


def test_check_cluster_command(tmp_path, capsys, cluster):
    files = [str(CLUSTER), str(CFN), str(KUBERAY), *map(str, GPU_SWEEPS)]
    assert cli.main(["check-cluster", *files]) == 0
    assert capsys.readouterr().out.count(": ok") == len(files)
    _drop_env(cluster, "RAY_AUTH_MODE")
    bad = tmp_path / "open.yaml"
    bad.write_text(yaml.safe_dump(cluster))
    assert cli.main(["check-cluster", str(bad)]) == 1
    assert "token authentication is off" in capsys.readouterr().out
    assert check_file(bad, schema=False)  # the same problems, without Ray's schema pass


def test_check_cluster_checks_files_against_each_other(tmp_path, capsys, kuberay):
    """A sweep that fits neither 1-GPU type, and a ServiceAccount whose role only EC2 can assume."""
    sweep = tmp_path / "fat.yaml"
    sweep.write_text(yaml.safe_dump(_sweep(cpus_per_worker=8)))
    assert check_file(sweep) == []  # alone: GPUs and a concurrency cap, nothing to fit against
    next(d for d in kuberay if d["kind"] == "ServiceAccount")["metadata"]["annotations"][
        "eks.amazonaws.com/role-arn"
    ] = "arn:aws:iam::123456789012:role/molre-ray-worker"
    manifest = tmp_path / "kuberay.yaml"
    manifest.write_text(yaml.safe_dump_all(kuberay))
    paths = [CLUSTER, CFN, manifest, sweep]
    found = cross_problems(paths)
    assert any(p == str(sweep) and "gpu_1x_l40s has (4)" in m for p, m in found), found
    assert any(p == str(sweep) and "gpu-1x has (3)" in m for p, m in found), found
    assert any(p == str(manifest) and "does not trust this ServiceAccount" in m for p, m in found), found
    assert cli.main(["check-cluster", *map(str, paths)]) == 1
    out = capsys.readouterr().out
    assert f"{sweep}: on {CLUSTER}: resources:" in out and f"{CLUSTER}: ok" in out


def test_runtime_env_file_keeps_uploads_small(tmp_path):
    env = yaml.safe_load((REPO / "deploy" / "runtime_env.yaml").read_text())
    assert ".git" in env["excludes"]
    assert all((REPO / module / "__init__.py").is_file() for module in env["py_modules"])
    assert "env_vars" not in env or not any("SECRET" in k for k in env["env_vars"])
    # Ray's own packaging (what `ray job submit --working-dir .` uploads) of a checkout with the local caches that
    # only .git/info/exclude lists, which Ray does not read
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    root = tmp_path / "checkout"
    for name in ("platform/molre/__init__.py", ".whl/molre-0.1.0-py3-none-any.whl", ".devbundle/bundle.tar",
                 ".git/info/exclude", "deploy/dist/molre.whl", "jobs/sweep.py"):  # fmt: skip
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("x")
    (root / ".git" / "info" / "exclude").write_text("/.whl/\n/.devbundle/\n")
    out = tmp_path / "package.zip"
    create_package(str(root), out, include_gitignore=True, excludes=env["excludes"])
    names = {n.rstrip("/") for n in zipfile.ZipFile(out).namelist()}
    assert {"platform/molre/__init__.py", "jobs/sweep.py"} <= names
    assert not [
        n for n in names if n.split("/")[0] in {".whl", ".devbundle", ".git"} or n.startswith("deploy/dist")
    ]
