"""Checks for the cluster definitions molre ships: `ray_cluster.yaml` (Ray cluster launcher, AWS), the
CloudFormation prerequisites (`deploy/aws-cluster.cfn.yaml`), the KubeRay manifest (`deploy/kuberay-rayjob.yaml`)
and the GPU sweeps meant to run on them (`search_spaces/*.yaml`).

Ray executes whatever reaches its ports, so a cluster is safe only if (1) token authentication is on for every
Ray process (on KubeRay also the autoscaler sidecar and the operator, through `authOptions`) and the token comes
from a file outside the checkout or a Kubernetes Secret, never from the config itself; (2) no Ray port (GCS 6379,
dashboard/job API 8265, client 10001, object/node managers, agents, worker ports) is reachable from outside the
cluster, and SSH only from a configurable CIDR that is never the whole internet; (3) on a VM the dashboard binds
to 127.0.0.1 and is reached through `ray dashboard` (an SSH tunnel); on KubeRay it stays on the pod's interfaces
for the operator and the submitter, behind a NetworkPolicy that admits only the job's pods and the operator;
(4) no usage statistics leave it.

`security_problems(config)` returns one line per broken rule (empty = fine); `layout_problems(config)` checks the
layout (on-demand CPU head, GPU workers from zero, the pinned Ray image); `sweep_problems(sweep, node_types)` a
sweep against a cluster that scales from zero. `molre check-cluster FILE...` runs the checks that fit each file,
`schema_problems` (Ray's own cluster-config schema, what `ray up` validates) and the checks between the files
given together (`cross_problems`: sweeps against clusters, the pods' IAM role against the template).
"""

from __future__ import annotations

import copy
import json
import logging
import re
import shlex
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

# NAME=value, the name optionally after a quote ("RAY_X=y" in a shell word), the value bare or quoted
_ENV_ASSIGN = re.compile(r"""(?<![\w-])["']?(RAY_[A-Z_]+)=("[^"]*"|'[^']*'|[^\s"';&|]*)""")
_SHELL_SEPARATOR = re.compile(r"\s*(?:;|&&|\|\||\n)\s*")
_RAY_START = re.compile(r"\bray start\b")
_DASHBOARD_HOST = re.compile(r"--dashboard-host[= ](\S+)")
_AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
_AWS_SECRET = re.compile(r"aws_secret_access_key", re.IGNORECASE)


# ---- Ray cluster launcher (ray_cluster.yaml) ---------------------------------------------------------


def _assignments(text: str) -> dict[str, str]:
    return {name: value.strip("\"'") for name, value in _ENV_ASSIGN.findall(text)}


def _docker_env(run_options: list[str]) -> dict[str, str]:
    """RAY_* variables that `docker run` options put into the container (`--env X=y`, `-e X=y`, `--env=X=y`);
    every command on the node runs in that container and sees them."""
    env: dict[str, str] = {}
    for option in run_options:
        try:
            words = shlex.split(str(option))
        except ValueError:  # unbalanced quotes: docker would refuse the option too
            continue
        for i, word in enumerate(words):
            value = None
            if word in ("--env", "-e") and i + 1 < len(words):
                value = words[i + 1]
            elif word.startswith("--env="):
                value = word.removeprefix("--env=")
            name, eq, setting = (value or "").partition("=")
            if eq and name.startswith("RAY_"):
                env[name] = setting
    return env


def _start_command_env(command: str) -> dict[str, str]:
    """RAY_* variables the `ray start` of one launcher command sees from the command itself: `export X=y`
    statements before it and `X=y ray start` prefixes. Each launcher command runs in its own shell, so nothing
    carries over from an earlier command of the list (`export ...; ray stop` then `ray start` sets nothing)."""
    env: dict[str, str] = {}
    for segment in _SHELL_SEPARATOR.split(command):
        start = _RAY_START.search(segment)
        if start:
            env.update(_assignments(segment[: start.start()]))  # `X=y ray start`, `env X=y ray start`
            break
        if re.match(r"export\s", segment):
            env.update(_assignments(segment))
    return env


def _env_for_start(commands: list[str], run_options: list[str]) -> dict[str, str]:
    """RAY_* variables the (first) `ray start` of this command list sees: the container's (docker --env), then
    what its own command sets."""
    env = _docker_env(run_options)
    start = next((str(c) for c in commands if _RAY_START.search(str(c))), None)
    if start is not None:
        env.update(_start_command_env(start))
    return env


def _starts(commands: list[str]) -> list[str]:
    return [str(c) for c in commands if _RAY_START.search(str(c))]


def checkout_of(path: str | Path) -> Path | None:
    """The git checkout a file belongs to (the nearest folder with a .git), or None."""
    for folder in Path(path).resolve().parents:
        if (folder / ".git").exists():
            return folder
    return None


def _inside(local: str, checkout: Path | None) -> bool:
    """Whether a file_mounts source lies in the checkout `ray up` runs from: a relative source always does
    (the launcher resolves it against the current folder, the repository root), an absolute one when under it."""
    path = Path(local).expanduser()
    if not path.is_absolute():
        return not local.startswith("~")
    if checkout is None:
        return False
    try:
        path.resolve().relative_to(checkout)
    except ValueError:
        return False
    return True


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


def security_problems(config: dict, checkout: Path | None = None) -> list[str]:
    """Broken security rules of a Ray cluster-launcher config (a loaded ray_cluster.yaml); [] when none.
    ``checkout``: the repository the config lives in (a token file inside it is refused)."""
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

    file_mounts = {str(k): str(v) for k, v in (config.get("file_mounts") or {}).items()}
    mounts = set(file_mounts)
    token_sources_reported: set[str] = set()
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
            for target in sorted(candidates & mounts):
                if _inside(file_mounts[target], checkout) and target not in token_sources_reported:
                    token_sources_reported.add(target)
                    problems.append(
                        f"file_mounts: the token {target} comes from {file_mounts[target]!r}, inside the "
                        "checkout, where it can be committed or uploaded with `ray job submit --working-dir .`; "
                        "keep it outside (~/.ray/auth_token)"
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

# How the KubeRay operator's own pods are labelled (Helm chart; the kustomize manifests use "kuberay"). The
# operator reaches the head's dashboard / job API (8265) to submit and poll RayJobs and RayServices.
OPERATOR_LABEL = "app.kubernetes.io/name"
OPERATOR_NAMES = {"kuberay-operator", "kuberay"}
DASHBOARD_PORT = 8265


def _env(container: dict) -> dict[str, dict]:
    return {e.get("name"): e for e in container.get("env") or []}


def _literal_token_problems(container: dict, where: str) -> list[str]:
    if "value" in (_env(container).get("RAY_AUTH_TOKEN") or {}):
        return [f"{where}: RAY_AUTH_TOKEN is a literal in the manifest; take it from a Secret"]
    return []


def _container_token_problems(container: dict, where: str) -> list[str]:
    """Token auth set up by hand (no authOptions): RAY_AUTH_MODE=token and the token from a Secret or a file."""
    env = _env(container)
    problems = []
    if (env.get("RAY_AUTH_MODE") or {}).get("value") != "token":
        problems.append(f"{where}: RAY_AUTH_MODE is not 'token'")
    token = env.get("RAY_AUTH_TOKEN") or {}
    if "value" not in token and not (
        (token.get("valueFrom") or {}).get("secretKeyRef") or "RAY_AUTH_TOKEN_PATH" in env
    ):
        problems.append(f"{where}: no RAY_AUTH_TOKEN from a Secret (secretKeyRef) or RAY_AUTH_TOKEN_PATH")
    return problems


def _pod_labels(template: dict) -> dict:
    return (template.get("metadata") or {}).get("labels") or {}


def _cluster_spec(doc: dict) -> dict:
    """The RayCluster spec of a RayCluster, RayJob (rayClusterSpec) or RayService (rayClusterConfig)."""
    spec = doc.get("spec") or {}
    key = {"RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}.get(str(doc.get("kind")))
    return (spec.get(key) if key else spec) or {}


def kuberay_security_problems(documents: list[dict]) -> list[str]:
    """Security rules for KubeRay manifests (RayJob or RayCluster plus the objects around them)."""
    problems: list[str] = []
    documents = [d for d in documents if isinstance(d, dict)]
    ray_pods: list[dict] = []  # pod templates of Ray nodes (head + workers)
    head_pods: list[tuple[str, dict]] = []  # (owner, head pod template) of clusters the operator must reach
    for doc in documents:
        kind, name = doc.get("kind"), (doc.get("metadata") or {}).get("name", "?")
        spec = doc.get("spec") or {}
        if kind == "Secret" and (doc.get("data") or doc.get("stringData")):
            problems.append(f"Secret/{name}: secret material in the manifest; create it with kubectl instead")
        if kind == "Ingress":
            problems.append(f"Ingress/{name}: Ray's dashboard/job API must not be exposed through an Ingress")
        if kind == "Service" and spec.get("type") in ("LoadBalancer", "NodePort"):
            problems.append(f"Service/{name}: type {spec['type']} exposes Ray outside the cluster")
        if kind not in ("RayJob", "RayCluster", "RayService"):
            continue
        cluster = _cluster_spec(doc)
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
                problems += _literal_token_problems(c, where)
                if not auth_options:
                    problems += _container_token_problems(c, where)
                if (_env(c).get("RAY_USAGE_STATS_ENABLED") or {}).get("value") != "0":
                    problems.append(f"{where}: RAY_USAGE_STATS_ENABLED is not '0'")
                if any(p.get("hostPort") for p in c.get("ports") or []):
                    problems.append(f"{where}: hostPort publishes a Ray port on the node's address")
        autoscaler = cluster.get("autoscalerOptions") or {}
        problems += _literal_token_problems(autoscaler, f"{kind}/{name} autoscalerOptions.env")
        if cluster.get("enableInTreeAutoscaling") and not auth_options:
            # The operator adds the autoscaler as a sidecar of the head with only autoscalerOptions' env: without
            # the token it cannot talk to the GCS, so worker groups never scale up from zero.
            problems += [
                f"{p} (the autoscaler sidecar cannot reach the GCS, so no worker group scales up; use "
                "authOptions: {mode: token} or give autoscalerOptions.env the token)"
                for p in _container_token_problems(autoscaler, f"{kind}/{name} autoscalerOptions.env")
            ]
        if kind in ("RayJob", "RayService"):
            head_pods.append((f"{kind}/{name}", head.get("template") or {}))
            if not auth_options:
                problems.append(
                    f"{kind}/{name}: token auth without authOptions: {{mode: token}} in the cluster spec: the "
                    f"KubeRay operator talks to the head's dashboard API ({DASHBOARD_PORT}: job submission and "
                    "status) and sends the token only with authOptions (KubeRay >= 1.5.1)"
                )
        if kind == "RayJob" and spec.get("submissionMode", "K8sJobMode") == "K8sJobMode" and not auth_options:
            submitter = ((spec.get("submitterPodTemplate") or {}).get("spec") or {}).get("containers") or []
            if not submitter:
                problems.append(f"RayJob/{name}: no submitterPodTemplate, so the submitter has no token")
            for c in submitter:
                problems += _container_token_problems(c, f"RayJob/{name} submitter {c.get('name', '?')}")
        for c in ((spec.get("submitterPodTemplate") or {}).get("spec") or {}).get("containers") or []:
            problems += _literal_token_problems(c, f"{kind}/{name} submitter {c.get('name', '?')}")
    if ray_pods:
        problems += _network_policy_problems(documents, ray_pods, head_pods)
    return problems


def _selects(policy: dict, labels: dict) -> bool:
    selector = ((policy.get("spec") or {}).get("podSelector") or {}).get("matchLabels")
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _admits_operator(rule: dict) -> bool:
    """An ingress rule whose sources include the KubeRay operator's pods (in its own namespace) on 8265."""
    ports = rule.get("ports") or []
    if ports and not any(p.get("port") in (DASHBOARD_PORT, str(DASHBOARD_PORT), "dashboard") for p in ports):
        return False
    for source in rule.get("from") or []:
        pods = (source.get("podSelector") or {}).get("matchLabels") or {}
        # a podSelector alone only matches pods of the policy's own namespace; the operator runs in another
        if pods.get(OPERATOR_LABEL) in OPERATOR_NAMES and "namespaceSelector" in source:
            return True
    return False


def _network_policy_problems(
    documents: list[dict], ray_pods: list[dict], head_pods: list[tuple[str, dict]] = ()
) -> list[str]:
    """Some NetworkPolicy must select every Ray pod and admit only pods (no ipBlock, no allow-all rule); the
    heads of RayJobs / RayServices must admit the KubeRay operator on the dashboard port."""
    policies = [d for d in documents if d.get("kind") == "NetworkPolicy"]
    problems = []
    for template in ray_pods:
        labels = _pod_labels(template)
        if not any(_selects(p, labels) for p in policies):
            problems.append(f"no NetworkPolicy selects the Ray pods labelled {labels or '{}'}")
    for owner, template in head_pods:
        labels = _pod_labels(template)
        selecting = [p for p in policies if _selects(p, labels)]
        rules = [r for p in selecting for r in (p.get("spec") or {}).get("ingress") or []]
        if selecting and not any(_admits_operator(r) for r in rules):
            problems.append(
                f"{owner}: no NetworkPolicy rule admits the KubeRay operator (pods labelled "
                f"{OPERATOR_LABEL}: kuberay-operator, with a namespaceSelector for its namespace) to the head's "
                f"port {DASHBOARD_PORT}: the operator cannot submit or follow the job"
            )
    for policy in policies:
        name = (policy.get("metadata") or {}).get("name", "?")
        for i, rule in enumerate((policy.get("spec") or {}).get("ingress") or []):
            sources = rule.get("from")
            if not sources:
                problems.append(f"NetworkPolicy/{name}: ingress[{i}] admits every source")
            for source in sources or []:
                if "ipBlock" in source:
                    problems.append(f"NetworkPolicy/{name}: ingress[{i}] admits an ipBlock; admit pods only")
                if source.get("namespaceSelector") is not None and not (source.get("podSelector") or {}).get(
                    "matchLabels"
                ):
                    problems.append(
                        f"NetworkPolicy/{name}: ingress[{i}] admits every pod of the selected namespaces; "
                        "add a podSelector"
                    )
    return sorted(set(problems), key=problems.index)


def kuberay_layout_problems(
    documents: list[dict], ray_version: str | None = None, checkout: Path | None = None
) -> list[str]:
    """Head without CPUs, worker groups from zero, Ray pinned, the dashboard reachable through the head Service,
    and (given the ``checkout``) the RayJob's --config file present in it."""
    problems = []
    for doc in documents:
        if not isinstance(doc, dict) or doc.get("kind") not in ("RayJob", "RayCluster", "RayService"):
            continue
        cluster = _cluster_spec(doc)
        if ray_version and str(cluster.get("rayVersion")) != ray_version:
            problems.append(f"{doc['kind']}: rayVersion {cluster.get('rayVersion')!r} is not {ray_version}")
        params = (cluster.get("headGroupSpec") or {}).get("rayStartParams") or {}
        if str(params.get("num-cpus", "")) != "0":
            problems.append(f"{doc['kind']}: the head should advertise num-cpus '0' (no training on it)")
        if doc["kind"] in ("RayJob", "RayService") and str(params.get("dashboard-host", "")) in (
            "127.0.0.1",
            "localhost",
        ):
            problems.append(
                f"{doc['kind']}: dashboard-host {params['dashboard-host']} hides the job API from the head "
                "Service, through which the KubeRay operator and the submitter reach it"
            )
        for group in cluster.get("workerGroupSpecs") or []:
            if group.get("minReplicas", 0) != 0:
                problems.append(
                    f"workerGroup {group.get('groupName')}: minReplicas must be 0 (scale from zero)"
                )
        config = re.search(r"--config[= ](\S+)", str((doc.get("spec") or {}).get("entrypoint", "")))
        if checkout is not None and config and not (checkout / config.group(1)).is_file():
            problems.append(
                f"{doc['kind']}: the entrypoint's --config {config.group(1)} is not in the repository"
            )
    return problems


# ---- sweeps on a cluster (search_spaces/*.yaml) ---------------------------------------------------------


def _quantity(value: Any) -> float:
    """A Kubernetes CPU / count quantity ("3", 3, "500m") as a number."""
    text = str(value or 0)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def cluster_node_types(config: dict) -> dict[str, dict[str, float]]:
    """Worker node types of a ray_cluster.yaml: {name: {"CPU", "GPU", "max"}}."""
    head = config.get("head_node_type")
    cap = config.get("max_workers", 2**31)
    return {
        name: {
            "CPU": float((t.get("resources") or {}).get("CPU", 0)),
            "GPU": float((t.get("resources") or {}).get("GPU", 0)),
            "max": min(t.get("max_workers", cap), cap),
        }
        for name, t in (config.get("available_node_types") or {}).items()
        if name != head
    }


def kuberay_node_types(documents: list[dict]) -> dict[str, dict[str, float]]:
    """Worker groups of KubeRay manifests, as Ray sees them: CPUs from num-cpus or the Ray container's CPU limit
    (else request), GPUs from nvidia.com/gpu."""
    types = {}
    for doc in documents:
        if not isinstance(doc, dict) or doc.get("kind") not in ("RayJob", "RayCluster", "RayService"):
            continue
        for group in _cluster_spec(doc).get("workerGroupSpecs") or []:
            containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or [{}]
            resources = containers[0].get("resources") or {}
            limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
            params = group.get("rayStartParams") or {}
            cpu = params.get("num-cpus", limits.get("cpu", requests.get("cpu", 0)))
            gpu = params.get("num-gpus", limits.get("nvidia.com/gpu", requests.get("nvidia.com/gpu", 0)))
            types[str(group.get("groupName"))] = {
                "CPU": _quantity(cpu),
                "GPU": _quantity(gpu),
                "max": int(group.get("maxReplicas", 2**31)),
            }
    return types


def sweep_problems(sweep: dict, node_types: dict[str, dict[str, float]] | None = None) -> list[str]:
    """A GPU sweep (a search-space file) on an autoscaling cluster whose GPU nodes start from zero: GPUs asked
    for explicitly, a concurrency cap, and (given the cluster's worker ``node_types``) trials that fit them."""
    problems = []
    base = sweep.get("base") or {}
    use_gpu = (base.get("scaling") or {}).get("use_gpu", "auto")
    if use_gpu is not True:
        problems.append(
            f"base.scaling.use_gpu is {use_gpu!r}: it must be true on a cluster whose GPU nodes start from zero "
            "(auto looks for GPUs when a trial starts, finds none and trains on CPU)"
        )
    res = sweep.get("resources") or {}
    concurrent = res.get("max_concurrent_trials")
    if not concurrent:
        problems.append(
            "resources.max_concurrent_trials is not set: it is then sized from the GPUs present when the sweep "
            "starts (none on a cluster that scales from zero), so trials run one at a time"
        )
    if node_types is None:
        return problems
    workers = int(res.get("num_workers", 1))
    cpus, gpus = float(res.get("cpus_per_worker", 1.0)), float(res.get("gpus_per_worker", 1.0))
    trial_gpus, trial_cpus = workers * gpus, workers * cpus + 1  # + 1 CPU for the trial's Ray Data reads
    hosts = {n: t for n, t in node_types.items() if t["GPU"] >= trial_gpus}
    if not hosts:
        problems.append(f"resources: a trial needs {trial_gpus:g} GPUs; no worker node type has that many")
    for name, node_type in hosts.items():
        if trial_cpus > node_type["CPU"]:
            problems.append(
                f"resources: a trial's {workers} Train worker(s) x {cpus:g} CPUs + 1 CPU for its data reads "
                f"need {trial_cpus:g} CPUs, more than node type {name} has ({node_type['CPU']:g}): it never "
                "launches for this sweep (cpus_per_worker too high)"
            )
    capacity = sum(t["GPU"] * t["max"] for t in node_types.values())
    if concurrent and trial_gpus and concurrent * trial_gpus > capacity:
        problems.append(
            f"resources.max_concurrent_trials {concurrent} x {trial_gpus:g} GPUs is more than the cluster's "
            f"{capacity:g} GPUs at full scale"
        )
    return problems


def irsa_problems(documents: list[dict], template: dict) -> list[str]:
    """Each ServiceAccount's IAM role (eks.amazonaws.com/role-arn) must be a role of the CloudFormation template
    that pods can assume: trusting the EKS OIDC provider (IRSA) or pods.eks.amazonaws.com, not only EC2."""
    problems = []
    roles = {
        str((r.get("Properties") or {}).get("RoleName")): r.get("Properties") or {}
        for r in (template.get("Resources") or {}).values()
        if r.get("Type") == "AWS::IAM::Role"
    }
    for doc in documents:
        if not isinstance(doc, dict) or doc.get("kind") != "ServiceAccount":
            continue
        name = (doc.get("metadata") or {}).get("name", "?")
        arn = str(
            ((doc.get("metadata") or {}).get("annotations") or {}).get("eks.amazonaws.com/role-arn", "")
        )
        if not arn:
            continue
        role = roles.get(arn.rsplit("/", 1)[-1])
        if role is None:
            problems.append(f"ServiceAccount/{name}: role {arn} is not a role of the CloudFormation template")
            continue
        trust = json.dumps(role.get("AssumeRolePolicyDocument"))
        if not (
            ("AssumeRoleWithWebIdentity" in trust and f":{name}" in trust)
            or "pods.eks.amazonaws.com" in trust
        ):
            problems.append(
                f"ServiceAccount/{name}: role {arn} does not trust this ServiceAccount (no web-identity trust of "
                "the EKS OIDC provider for it, no pods.eks.amazonaws.com): pods cannot assume it"
            )
    return problems


# ---- files and the command ------------------------------------------------------------------------------


def kind_of(documents: list) -> str:
    """'ray-cluster', 'cloudformation', 'kuberay', 'sweep' or 'unknown'."""
    first = next((d for d in documents if isinstance(d, dict)), {})
    if "AWSTemplateFormatVersion" in first or "Resources" in first:
        return "cloudformation"
    if any(isinstance(d, dict) and str(d.get("apiVersion", "")).startswith("ray.io/") for d in documents):
        return "kuberay"
    if "provider" in first and "available_node_types" in first:
        return "ray-cluster"
    if "space" in first and "search" in first:
        return "sweep"
    return "unknown"


def _load(path: str | Path) -> list:
    return list(yaml.safe_load_all(Path(path).read_text()))


def check_file(path: str | Path, schema: bool = True) -> list[str]:
    """Every check that fits the file's kind; [] when it passes."""
    import ray

    documents = _load(path)
    kind = kind_of(documents)
    checkout = checkout_of(path)
    if kind == "ray-cluster":
        config = documents[0]
        problems = security_problems(config, checkout) + layout_problems(config, ray.__version__)
        return problems + (schema_problems(config) if schema else [])
    if kind == "cloudformation":
        return cfn_security_problems(documents[0])
    if kind == "kuberay":
        return kuberay_security_problems(documents) + kuberay_layout_problems(
            documents, ray.__version__, checkout
        )
    if kind == "sweep":
        return sweep_problems(documents[0])
    return [f"{path}: not a Ray cluster config, CloudFormation template, KubeRay manifest or sweep file"]


def cross_problems(paths: list[str | Path]) -> list[tuple[str, str]]:
    """(path, problem) of checks between the files given together: each sweep against each cluster (ray_cluster
    / KubeRay) it may run on, each KubeRay ServiceAccount's role against the CloudFormation template."""
    loaded = [(str(p), _load(p)) for p in paths]
    kinds = [(p, kind_of(d), d) for p, d in loaded]
    clusters = [(p, cluster_node_types(d[0])) for p, k, d in kinds if k == "ray-cluster"]
    clusters += [(p, kuberay_node_types(d)) for p, k, d in kinds if k == "kuberay"]
    problems = []
    for sweep_path, kind, documents in kinds:
        if kind == "sweep":
            for cluster_path, node_types in clusters:
                alone = sweep_problems(documents[0])  # reported by check_file already
                problems += [
                    (sweep_path, f"on {cluster_path}: {p}")
                    for p in sweep_problems(documents[0], node_types)
                    if p not in alone
                ]
    templates = [d[0] for p, k, d in kinds if k == "cloudformation"]
    for path, kind, documents in kinds:
        if kind == "kuberay":
            problems += [(path, p) for t in templates for p in irsa_problems(documents, t)]
    return problems


def add_arguments(parser) -> None:
    parser.add_argument(
        "files",
        nargs="+",
        help="ray_cluster.yaml, deploy/aws-cluster.cfn.yaml, deploy/kuberay-rayjob.yaml, and GPU sweep files "
        "(search_spaces/*.yaml: checked against the cluster files given with them)",
    )


def run(args) -> int:
    failed: set[str] = set()
    found: dict[str, list[str]] = {str(path): check_file(path) for path in args.files}
    for path, problem in cross_problems(args.files):
        found[str(path)].append(problem)
    for path, problems in found.items():
        for problem in problems:
            print(f"{path}: {problem}")
        if not problems:
            print(f"{path}: ok")
        else:
            failed.add(path)
    return 1 if failed else 0
