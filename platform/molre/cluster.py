"""Checks for the cluster definitions molre ships: `ray_cluster.yaml` (Ray cluster launcher, AWS), the
CloudFormation prerequisites (`deploy/aws-cluster.cfn.yaml`) and the KubeRay manifest (`deploy/kuberay-rayjob.yaml`).

Ray executes whatever reaches its ports, so a cluster is safe only if (1) token authentication is on for every
Ray process and the token comes from a file or a Kubernetes Secret, never from the config itself; (2) no Ray port
(GCS 6379, dashboard/job API 8265, client 10001, object/node managers, agents, worker ports) is reachable from
outside the cluster, and SSH only from a configurable CIDR that is never the whole internet; (3) the dashboard
binds to 127.0.0.1 and is reached through `ray dashboard` (an SSH tunnel); (4) no usage statistics leave it.

`security_problems(config)` returns one line per broken rule (empty = fine); `layout_problems(config)` checks the
layout (on-demand CPU head, GPU workers from zero, the pinned Ray image). `molre check-cluster FILE...` runs the
checks that fit each file and `schema_problems` (Ray's own cluster-config schema, what `ray up` validates).
"""

from __future__ import annotations

import copy
import json
import logging
import re
from pathlib import Path
from typing import Any

import yaml

WORLD_CIDRS = {"0.0.0.0/0", "::/0"}
ANY_HOST = {"0.0.0.0", "::", "[::]"}
TOKEN_PATH_DEFAULTS = {
    "~/.ray/auth_token",
    "/home/ray/.ray/auth_token",
}  # Ray's default path in the container
# Ray's ports, for the messages: what an open rule would expose.
RAY_PORTS = "GCS 6379, dashboard/jobs 8265, client 10001, object manager 8076, worker ports 10002-19999"

_ENV_ASSIGN = re.compile(r"(?<![\w-])(RAY_[A-Z_]+)=(\S*)")
_DASHBOARD_HOST = re.compile(r"--dashboard-host[= ](\S+)")
_AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
_AWS_SECRET = re.compile(r"aws_secret_access_key", re.IGNORECASE)


# ---- Ray cluster launcher (ray_cluster.yaml) ---------------------------------------------------------


def _env_for_start(commands: list[str], run_options: list[str]) -> dict[str, str]:
    """RAY_* variables the `ray start` of this command list sees: docker --env options, then the commands."""
    env: dict[str, str] = {}
    for option in run_options:
        env.update(_ENV_ASSIGN.findall(str(option)))
    for command in commands:
        env.update(_ENV_ASSIGN.findall(str(command)))
        if re.search(r"\bray start\b", str(command)):
            break
    return env


def _starts(commands: list[str]) -> list[str]:
    return [str(c) for c in commands if re.search(r"\bray start\b", str(c))]


def _ingress_problems(rules: list[dict], where: str) -> list[str]:
    """EC2 IpPermissions: CIDR sources only for SSH, never the whole internet; Ray ports only from groups."""
    problems = []
    for rule in rules or []:
        cidrs = [r.get("CidrIp") for r in rule.get("IpRanges", [])]
        cidrs += [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
        lo, hi = rule.get("FromPort", -1), rule.get("ToPort", -1)
        proto = str(rule.get("IpProtocol", "-1"))
        ports = "all ports" if proto == "-1" or lo in (-1, None) else f"ports {lo}-{hi}"
        for cidr in cidrs:
            if cidr in WORLD_CIDRS:
                problems.append(f"{where}: {ports} open to {cidr} (the whole internet)")
            elif not (proto == "tcp" and lo == 22 and hi == 22):
                problems.append(
                    f"{where}: {ports} open to {cidr}; Ray ports ({RAY_PORTS}) must admit only the "
                    "cluster's own security group"
                )
    return problems


def security_problems(config: dict) -> list[str]:
    """Broken security rules of a Ray cluster-launcher config (a loaded ray_cluster.yaml); [] when none."""
    problems: list[str] = []
    provider = config.get("provider", {}) or {}
    docker = config.get("docker", {}) or {}
    run_options = [str(o) for o in docker.get("run_options", []) or []]
    text = json.dumps(config)

    # Secrets never live in the config: the token comes from a mounted file, AWS access from instance profiles.
    if _AWS_KEY_ID.search(text) or _AWS_SECRET.search(text):
        problems.append("AWS credentials in the config: use IAM instance profiles, never keys")
    if re.search(r"RAY_AUTH_TOKEN=\S", text):
        problems.append("RAY_AUTH_TOKEN set in the config: mount the token file and set RAY_AUTH_TOKEN_PATH")

    mounts = {str(k) for k in (config.get("file_mounts") or {})}
    for key, role in (("head_start_ray_commands", "head"), ("worker_start_ray_commands", "worker")):
        commands = [str(c) for c in config.get(key, []) or []]
        if not _starts(commands):
            problems.append(f"{key}: no `ray start` command")
            continue
        env = _env_for_start(commands, run_options)
        if env.get("RAY_AUTH_MODE") != "token":
            problems.append(
                f"{key}: Ray token authentication is off on {role} nodes (set RAY_AUTH_MODE=token)"
            )
        else:
            token_path = env.get("RAY_AUTH_TOKEN_PATH")
            candidates = {token_path} if token_path else TOKEN_PATH_DEFAULTS
            if not candidates & mounts:
                problems.append(
                    f"{key}: the token file ({token_path or '~/.ray/auth_token'}) is not in file_mounts, "
                    f"so {role} nodes have no token"
                )
        if env.get("RAY_USAGE_STATS_ENABLED") != "0" and not all(
            "--disable-usage-stats" in c for c in _starts(commands)
        ):
            problems.append(f"{key}: usage stats are on (set RAY_USAGE_STATS_ENABLED=0)")
        if role == "head":
            for command in _starts(commands):
                host = _DASHBOARD_HOST.search(command)
                if host and host.group(1).strip("'\"") in ANY_HOST:
                    problems.append(
                        f"{key}: --dashboard-host={host.group(1)} exposes the dashboard and job API on every "
                        "interface; bind 127.0.0.1 and use `ray dashboard`"
                    )

    if provider.get("type") == "aws":
        for name, node_type in (config.get("available_node_types") or {}).items():
            if not (node_type.get("node_config") or {}).get("SecurityGroupIds"):
                problems.append(
                    f"available_node_types.{name}: no SecurityGroupIds, so Ray creates its default group, "
                    "which opens SSH (22) to 0.0.0.0/0"
                )
        rules = (provider.get("security_group") or {}).get("IpPermissions", [])
        problems += _ingress_problems(rules, "provider.security_group.IpPermissions")
    return problems


def layout_problems(config: dict, ray_version: str | None = None) -> list[str]:
    """The intended shape: on-demand CPU-only head, GPU worker types from zero, image pinned to our Ray."""
    problems = []
    types = config.get("available_node_types") or {}
    head_name = config.get("head_node_type")
    head = types.get(head_name, {})
    if (head.get("node_config") or {}).get("InstanceMarketOptions"):
        problems.append(
            f"{head_name}: the head must be on-demand (it runs the sweep driver and trial drivers)"
        )
    if (head.get("resources") or {}).get("GPU"):
        problems.append(f"{head_name}: the head advertises GPUs; training belongs on the worker types")
    workers = {n: t for n, t in types.items() if n != head_name}
    if not any((t.get("resources") or {}).get("GPU") for t in workers.values()):
        problems.append("no GPU worker type")
    for name, node_type in workers.items():
        if node_type.get("min_workers", 0) != 0:
            problems.append(f"{name}: min_workers={node_type['min_workers']}; GPU workers scale from 0")
    if "idle_timeout_minutes" not in config:
        problems.append("idle_timeout_minutes is not set")
    if ray_version:
        image = str((config.get("docker") or {}).get("image", ""))
        if f":{ray_version}-" not in image and not image.endswith(f":{ray_version}"):
            problems.append(f"docker.image {image!r} is not pinned to Ray {ray_version}")
    return problems


def schema_problems(config: dict) -> list[str]:
    """Ray's own validation of a cluster-launcher config, as `ray up` runs it (defaults merged first)."""
    import jsonschema
    from ray.autoscaler._private import util

    level = util.logger.level
    util.logger.setLevel(logging.WARNING)  # prepare_config logs each default it fills in
    try:
        util.validate_config(util.prepare_config(copy.deepcopy(config)))
    except (jsonschema.ValidationError, ValueError, RuntimeError, KeyError) as err:
        return [f"Ray cluster-config schema: {getattr(err, 'message', err)}"]
    finally:
        util.logger.setLevel(level)
    return []


# ---- CloudFormation prerequisites (deploy/aws-cluster.cfn.yaml) ---------------------------------------


def _cidr_of(value: Any, parameters: dict) -> tuple[str | None, str | None]:
    """(literal CIDR or the parameter's default, the parameter name when it comes from one)."""
    if isinstance(value, dict) and "Ref" in value:
        name = value["Ref"]
        return str((parameters.get(name) or {}).get("Default", "")) or None, name
    return (str(value) if value is not None else None), None


def cfn_security_problems(template: dict) -> list[str]:
    """Security-group ingress of a CloudFormation template: SSH from a parameterised CIDR, the rest in-group."""
    problems = []
    parameters = template.get("Parameters") or {}
    resources = template.get("Resources") or {}
    rules: list[tuple[str, dict]] = []
    for name, resource in resources.items():
        props = resource.get("Properties") or {}
        if resource.get("Type") == "AWS::EC2::SecurityGroup":
            rules += [
                (f"{name}.SecurityGroupIngress[{i}]", r)
                for i, r in enumerate(props.get("SecurityGroupIngress") or [])
            ]
        elif resource.get("Type") == "AWS::EC2::SecurityGroupIngress":
            rules.append((name, props))
    ssh_parameters = []
    for where, rule in rules:
        if "SourceSecurityGroupId" in rule:
            continue  # members of a group (the cluster's own): fine for every port
        proto, lo, hi = str(rule.get("IpProtocol", "-1")), rule.get("FromPort"), rule.get("ToPort")
        for key in ("CidrIp", "CidrIpv6", "SourcePrefixListId"):
            if key not in rule:
                continue
            cidr, parameter = _cidr_of(rule[key], parameters)
            if cidr in WORLD_CIDRS:
                problems.append(f"{where}: open to {cidr} (the whole internet)")
            if not (proto == "tcp" and lo == 22 and hi == 22):
                problems.append(f"{where}: a CIDR source on ports {lo}-{hi}; Ray ports admit only the group")
            elif parameter:
                ssh_parameters.append(parameter)
                pattern = (parameters.get(parameter) or {}).get("AllowedPattern")
                if not pattern or any(re.fullmatch(pattern, world) for world in WORLD_CIDRS):
                    problems.append(f"Parameters.{parameter}: AllowedPattern must reject 0.0.0.0/0")
    if not ssh_parameters:
        problems.append("no SSH rule whose CIDR is a template parameter (the SSH CIDR must be configurable)")
    return problems


# ---- KubeRay (deploy/kuberay-rayjob.yaml) ------------------------------------------------------------


def _env(container: dict) -> dict[str, dict]:
    return {e.get("name"): e for e in container.get("env") or []}


def _container_token_problems(container: dict, where: str) -> list[str]:
    env = _env(container)
    problems = []
    if (env.get("RAY_AUTH_MODE") or {}).get("value") != "token":
        problems.append(f"{where}: RAY_AUTH_MODE is not 'token'")
    token = env.get("RAY_AUTH_TOKEN") or {}
    if "value" in token:
        problems.append(f"{where}: RAY_AUTH_TOKEN is a literal in the manifest; take it from a Secret")
    elif not ((token.get("valueFrom") or {}).get("secretKeyRef") or "RAY_AUTH_TOKEN_PATH" in env):
        problems.append(f"{where}: no RAY_AUTH_TOKEN from a Secret (secretKeyRef) or RAY_AUTH_TOKEN_PATH")
    return problems


def _pod_labels(template: dict) -> dict:
    return (template.get("metadata") or {}).get("labels") or {}


def kuberay_security_problems(documents: list[dict]) -> list[str]:
    """Security rules for KubeRay manifests (RayJob or RayCluster plus the objects around them)."""
    problems: list[str] = []
    documents = [d for d in documents if isinstance(d, dict)]
    ray_pods: list[dict] = []  # pod templates of Ray nodes (head + workers)
    for doc in documents:
        kind, name = doc.get("kind"), (doc.get("metadata") or {}).get("name", "?")
        spec = doc.get("spec") or {}
        if kind == "Secret" and (doc.get("data") or doc.get("stringData")):
            problems.append(f"Secret/{name}: secret material in the manifest; create it with kubectl instead")
        if kind == "Ingress":
            problems.append(f"Ingress/{name}: Ray's dashboard/job API must not be exposed through an Ingress")
        if kind == "Service" and spec.get("type") in ("LoadBalancer", "NodePort"):
            problems.append(f"Service/{name}: type {spec['type']} exposes Ray outside the cluster")
        if kind not in ("RayJob", "RayCluster"):
            continue
        cluster = spec.get("rayClusterSpec") if kind == "RayJob" else spec
        cluster = cluster or {}
        auth_options = (cluster.get("authOptions") or {}).get("mode") == "token"
        head = cluster.get("headGroupSpec") or {}
        if head.get("serviceType") in ("LoadBalancer", "NodePort"):
            problems.append(f"{kind}/{name}: head serviceType {head['serviceType']} exposes Ray ports")
        groups = [("head", head)] + [
            (f"workerGroup {g.get('groupName', '?')}", g) for g in cluster.get("workerGroupSpecs") or []
        ]
        for label, group in groups:
            template = group.get("template") or {}
            ray_pods.append(template)
            for c in (template.get("spec") or {}).get("containers") or []:
                where = f"{kind}/{name} {label} container {c.get('name', '?')}"
                if not auth_options:
                    problems += _container_token_problems(c, where)
                if (_env(c).get("RAY_USAGE_STATS_ENABLED") or {}).get("value") != "0":
                    problems.append(f"{where}: RAY_USAGE_STATS_ENABLED is not '0'")
                if any(p.get("hostPort") for p in c.get("ports") or []):
                    problems.append(f"{where}: hostPort publishes a Ray port on the node's address")
        if kind == "RayJob" and spec.get("submissionMode", "K8sJobMode") == "K8sJobMode" and not auth_options:
            submitter = ((spec.get("submitterPodTemplate") or {}).get("spec") or {}).get("containers") or []
            if not submitter:
                problems.append(f"RayJob/{name}: no submitterPodTemplate, so the submitter has no token")
            for c in submitter:
                problems += _container_token_problems(c, f"RayJob/{name} submitter {c.get('name', '?')}")
    if ray_pods:
        problems += _network_policy_problems(documents, ray_pods)
    return problems


def _network_policy_problems(documents: list[dict], ray_pods: list[dict]) -> list[str]:
    """Some NetworkPolicy must select every Ray pod and admit only pods (no ipBlock, no allow-all rule)."""
    policies = [d for d in documents if d.get("kind") == "NetworkPolicy"]
    problems = []
    for template in ray_pods:
        labels = _pod_labels(template)
        selecting = [
            p
            for p in policies
            if (sel := ((p.get("spec") or {}).get("podSelector") or {}).get("matchLabels"))
            and all(labels.get(k) == v for k, v in sel.items())
        ]
        if not selecting:
            problems.append(f"no NetworkPolicy selects the Ray pods labelled {labels or '{}'}")
    for policy in policies:
        name = (policy.get("metadata") or {}).get("name", "?")
        for i, rule in enumerate((policy.get("spec") or {}).get("ingress") or []):
            sources = rule.get("from")
            if not sources:
                problems.append(f"NetworkPolicy/{name}: ingress[{i}] admits every source")
            for source in sources or []:
                if "ipBlock" in source:
                    problems.append(f"NetworkPolicy/{name}: ingress[{i}] admits an ipBlock; admit pods only")
    return sorted(set(problems), key=problems.index)


def kuberay_layout_problems(documents: list[dict], ray_version: str | None = None) -> list[str]:
    problems = []
    for doc in documents:
        if not isinstance(doc, dict) or doc.get("kind") not in ("RayJob", "RayCluster"):
            continue
        cluster = (
            (doc.get("spec") or {}).get("rayClusterSpec") if doc["kind"] == "RayJob" else doc.get("spec")
        )
        cluster = cluster or {}
        if ray_version and str(cluster.get("rayVersion")) != ray_version:
            problems.append(f"{doc['kind']}: rayVersion {cluster.get('rayVersion')!r} is not {ray_version}")
        if str((cluster.get("headGroupSpec") or {}).get("rayStartParams", {}).get("num-cpus", "")) != "0":
            problems.append(f"{doc['kind']}: the head should advertise num-cpus '0' (no training on it)")
        for group in cluster.get("workerGroupSpecs") or []:
            if group.get("minReplicas", 0) != 0:
                problems.append(
                    f"workerGroup {group.get('groupName')}: minReplicas must be 0 (scale from zero)"
                )
    return problems


# ---- files and the command ------------------------------------------------------------------------------


def kind_of(documents: list) -> str:
    """'ray-cluster', 'cloudformation', 'kuberay' or 'unknown'."""
    first = next((d for d in documents if isinstance(d, dict)), {})
    if "AWSTemplateFormatVersion" in first or "Resources" in first:
        return "cloudformation"
    if any(isinstance(d, dict) and str(d.get("apiVersion", "")).startswith("ray.io/") for d in documents):
        return "kuberay"
    if "provider" in first and "available_node_types" in first:
        return "ray-cluster"
    return "unknown"


def check_file(path: str | Path, schema: bool = True) -> list[str]:
    """Every check that fits the file's kind; [] when it passes."""
    import ray

    documents = list(yaml.safe_load_all(Path(path).read_text()))
    kind = kind_of(documents)
    if kind == "ray-cluster":
        config = documents[0]
        problems = security_problems(config) + layout_problems(config, ray.__version__)
        return problems + (schema_problems(config) if schema else [])
    if kind == "cloudformation":
        return cfn_security_problems(documents[0])
    if kind == "kuberay":
        return kuberay_security_problems(documents) + kuberay_layout_problems(documents, ray.__version__)
    return [f"{path}: not a Ray cluster config, CloudFormation template or KubeRay manifest"]


def add_arguments(parser) -> None:
    parser.add_argument(
        "files", nargs="+", help="ray_cluster.yaml, deploy/aws-cluster.cfn.yaml, deploy/kuberay-rayjob.yaml"
    )


def run(args) -> int:
    failed = 0
    for path in args.files:
        problems = check_file(path)
        for problem in problems:
            print(f"{path}: {problem}")
        if not problems:
            print(f"{path}: ok")
        failed += bool(problems)
    return 1 if failed else 0
