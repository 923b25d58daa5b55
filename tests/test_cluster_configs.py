"""cluster/ and infra/ without a cloud account: the launcher YAMLs validate against the schema
that ships inside the ray package, every KubeRay / helm / terraform file parses, the RayJob's
command is a valid fmrilm job, and versions agree across pyproject, Dockerfile and cluster
configs (with a test that the check catches drift)."""

import glob
import json
import os
import re
import shlex
import shutil

import hcl2
import jsonschema
import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHERS = ["cluster/aws.yaml", "cluster/gcp.yaml"]


def _ray_schema() -> dict:
    import ray

    with open(os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")) as f:
        return json.load(f)


def _yaml_docs(path: str) -> list:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


@pytest.mark.parametrize("path", LAUNCHERS)
def test_launcher_configs_match_rays_schema(path):
    config = _yaml_docs(os.path.join(ROOT, path))[0]
    jsonschema.validate(config, _ray_schema())
    head = config["head_start_ray_commands"][-1]
    assert "--dashboard-host=127.0.0.1" in head  # the dashboard only through `ray dashboard` (SSH tunnel)
    # token auth on every node, the token fetched from the cloud's secret store at setup, never in the file
    for cmd in (head, config["worker_start_ray_commands"][-1]):
        assert cmd.startswith("RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$HOME/.ray/auth_token ray start")
    setup = " ".join(config["setup_commands"])
    assert "> ~/.ray/auth_token" in setup and "umask 077" in setup and ("secretsmanager" in setup or "secretmanager" in setup)
    assert "RAY_AUTH_TOKEN=" not in yaml.safe_dump(config)
    types = config["available_node_types"]
    assert {"head", "cpu_worker", "gpu_worker"} <= set(types) and config["head_node_type"] == "head"
    if config["provider"]["type"] == "aws":
        assert {t["node_config"]["IamInstanceProfile"]["Name"] for t in types.values()} == {"fmrilm-ray-head", "fmrilm-ray-worker"}
    broken = dict(config, max_wrkers=3)
    with pytest.raises(jsonschema.ValidationError):  # the schema check can fail
        jsonschema.validate(broken, _ray_schema())


def test_kuberay_and_helm_files_parse_and_keep_the_dashboard_private():
    docs = {p: _yaml_docs(p) for p in glob.glob(os.path.join(ROOT, "cluster/kuberay/*.yaml")) + glob.glob(os.path.join(ROOT, "infra/helm/*.yaml"))}
    assert len(docs) >= 5 and all(docs.values())
    kinds = {d.get("kind") for ds in docs.values() for d in ds}
    assert {"RayCluster", "RayJob", "ServiceAccount"} <= kinds
    job = next(d for ds in docs.values() for d in ds if d.get("kind") == "RayJob")["spec"]
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0 and job["backoffLimit"] >= 1
    for ds in docs.values():
        for d in ds:
            for head in (d.get("spec", {}).get("headGroupSpec"), d.get("spec", {}).get("rayClusterSpec", {}).get("headGroupSpec"), d.get("head")):
                if head:
                    assert head.get("serviceType", "ClusterIP") == "ClusterIP"


def _containers(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    cluster = spec.get("rayClusterSpec", spec)
    groups = [cluster.get("headGroupSpec", {})] + cluster.get("workerGroupSpecs", [])
    return [c for g in groups for c in g.get("template", {}).get("spec", {}).get("containers", [])]


def _token_env(env: list[dict]) -> bool:
    by_name = {e["name"]: e for e in env}
    return (by_name.get("RAY_AUTH_MODE", {}).get("value") == "token"
            and by_name.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {}).get("name") == "fmrilm-ray-auth"
            and "value" not in by_name["RAY_AUTH_TOKEN"])


def test_every_kuberay_pod_requires_the_token_from_a_secret_and_a_network_policy_guards_the_head():
    ray_docs = [d for p in ("cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob.yaml") for d in _yaml_docs(os.path.join(ROOT, p))]
    containers = [c for d in ray_docs if d.get("kind") in ("RayCluster", "RayJob") for c in _containers(d)]
    assert len(containers) >= 5 and all(_token_env(c.get("env", [])) for c in containers)
    helm = _yaml_docs(os.path.join(ROOT, "infra/helm/ray-cluster-values.yaml"))[0]
    groups = [helm["head"], helm["worker"], *helm["additionalWorkerGroups"].values()]
    assert all(_token_env(g.get("containerEnv", [])) for g in groups)
    policy = _yaml_docs(os.path.join(ROOT, "cluster/kuberay/networkpolicy.yaml"))[0]
    assert policy["kind"] == "NetworkPolicy" and policy["spec"]["policyTypes"] == ["Ingress"]
    assert policy["spec"]["podSelector"]["matchExpressions"][0]["key"] == "ray.io/cluster"
    sources = [f for rule in policy["spec"]["ingress"] for f in rule["from"]]
    assert sources and all("podSelector" in f for f in sources) and not any(f.get("ipBlock") for f in sources)


def test_the_rayjob_runs_a_valid_fmrilm_spec(monkeypatch):
    from fmrilm.registry import load_job

    job = next(d for d in _yaml_docs(os.path.join(ROOT, "cluster/kuberay/rayjob.yaml")) if d["kind"] == "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:4] == ["python", "-m", "fmrilm", "run"]
    monkeypatch.chdir(ROOT)
    spec, _, _ = load_job(argv[4], argv[5:])
    assert spec.run.storage.startswith("s3://") and spec.data.root.startswith("s3://")


def _unquote(value):
    """python-hcl2 keeps the quotes of labels and strings; drop them."""
    if isinstance(value, dict):
        return {_unquote(k): _unquote(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unquote(v) for v in value]
    return value.strip('"') if isinstance(value, str) else value


def _terraform(section: str = "resource") -> dict:
    tf = {}
    paths = glob.glob(os.path.join(ROOT, "infra/terraform/aws/*.tf"))
    assert len(paths) >= 5
    for path in paths:
        with open(path) as f:
            for block in _unquote(hcl2.load(f)).get(section, []):
                for kind, named in block.items():
                    tf.setdefault(kind, {}).update(named)
    return tf


def _statements(doc: dict) -> list[dict]:
    st = doc["statement"]
    return st if isinstance(st, list) else [st]


def _conditions(statement: dict) -> list[dict]:
    c = statement.get("condition", [])
    return c if isinstance(c, list) else [c]


def test_terraform_parses_and_the_bucket_is_private_encrypted_and_spares_runs_and_datasets():
    tf = _terraform()
    assert all(tf["aws_s3_bucket_public_access_block"]["data"][k] for k in
               ("block_public_acls", "block_public_policy", "ignore_public_acls", "restrict_public_buckets"))
    assert "aws_s3_bucket_server_side_encryption_configuration" in tf
    rules = tf["aws_s3_bucket_lifecycle_configuration"]["data"]["rule"]
    rules = rules if isinstance(rules, list) else [rules]
    expiring = [(r["filter"][0] if isinstance(r["filter"], list) else r["filter"]).get("prefix") for r in rules if r.get("expiration")]
    assert expiring == ["scratch/"]  # never runs/ (live checkpoints, the tokenizer a RayJob reads) nor datasets/
    assert {"fmrilm-ray-head", "fmrilm-ray-worker"} == {p["name"] for p in tf["aws_iam_instance_profile"].values()}
    assert "aws_secretsmanager_secret" in tf and "aws_secretsmanager_secret_version" not in tf  # the token's value is never in the state


def test_iam_is_least_privilege():
    docs = _terraform("data")["aws_iam_policy_document"]
    for name, doc in docs.items():
        for st in _statements(doc):
            resources = st.get("resources", [])
            resources = resources if isinstance(resources, list) else [resources]
            actions = st.get("actions", [])
            if "*" in resources:  # only read-only calls without resource-level permissions may use "*"
                assert all(a.startswith("ec2:Describe") or a == "ecr:GetAuthorizationToken" or a == "sts:AssumeRole" for a in actions), (name, st)
            if {"ec2:RunInstances", "ec2:CreateTags"} & set(actions):
                assert all("*" != r for r in resources), (name, st)
                assert _conditions(st) or not any(":instance/" in r for r in resources), (name, st)
    token = next(st for st in _statements(docs["bucket_rw"]) if st.get("sid") == "ReadRayAuthToken")
    assert token["actions"] == ["secretsmanager:GetSecretValue"] and "ray_auth_token" in token["resources"][0]
    deny = next(st for st in _statements(docs["bucket"]) if st.get("effect") == "Deny")
    assert {"s3:DeleteObjectVersion", "s3:DeleteBucket", "s3:PutLifecycleConfiguration", "s3:PutBucketVersioning"} <= set(deny["actions"])


def versions(root: str) -> dict[str, set[str]]:
    """Every place a version is pinned: {what: {versions found}} (one version each when in agreement)."""
    text = {p: open(os.path.join(root, p)).read() for p in
            ["pyproject.toml", "infra/docker/Dockerfile", *LAUNCHERS, "cluster/kuberay/raycluster.yaml",
             "cluster/kuberay/rayjob.yaml", "infra/helm/ray-cluster-values.yaml"]}
    found: dict[str, set[str]] = {"ray": set(), "torch": set(), "fmrilm": set()}
    found["ray"] |= set(re.findall(r'"ray\[[^\]]*\]==([\d.]+)"', text["pyproject.toml"]))
    found["torch"] |= set(re.findall(r'"torch==([\d.]+)"', text["pyproject.toml"]))
    found["fmrilm"] |= set(re.findall(r'^version = "([\d.]+)"', text["pyproject.toml"], re.M))
    docker = text["infra/docker/Dockerfile"]
    found["ray"] |= set(re.findall(r"^ARG RAY_VERSION=([\d.]+)", docker, re.M))
    found["torch"] |= set(re.findall(r"^ARG TORCH_VERSION=([\d.]+)", docker, re.M))
    for p in ("cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob.yaml", "infra/helm/ray-cluster-values.yaml"):
        found["ray"] |= set(re.findall(r'rayVersion: "([\d.]+)"', text[p]))
    for p in (*LAUNCHERS, "cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob.yaml"):
        found["fmrilm"] |= set(re.findall(r"/fmrilm:([\d.]+)", text[p]))
    found["fmrilm"] |= set(re.findall(r'tag: "([\d.]+)"', text["infra/helm/ray-cluster-values.yaml"]))
    return found


def test_versions_agree_across_pyproject_dockerfile_and_cluster_configs():
    found = versions(ROOT)
    assert all(len(v) == 1 for v in found.values()), f"versions drifted: {found}"


def test_the_version_check_catches_drift(tmp_path):
    for p in ("pyproject.toml", "infra", "cluster"):
        src = os.path.join(ROOT, p)
        (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, tmp_path / p)
    docker = tmp_path / "infra/docker/Dockerfile"
    docker.write_text(docker.read_text().replace("ARG RAY_VERSION=2.60.0", "ARG RAY_VERSION=2.61.0"))
    assert versions(str(tmp_path))["ray"] == {"2.60.0", "2.61.0"}
