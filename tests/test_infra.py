"""Offline checks for infra/: KubeRay manifests, the renderer, Dockerfiles.

* Every RayCluster / RayJob rendered with the default values is validated against
  the ``v1`` ``openAPIV3Schema`` of the KubeRay CRDs (``jsonschema``), plus a
  strict walk that rejects fields the API server would prune (typos), plus the
  subset of the KubeRay operator's own spec validation that applies offline.
* Project policy (CPU-only head, GPU group with autoscaling bounds, /dev/shm,
  read-only weights PVC, S3 creds from a Secret, non-root) is asserted.
* RayJob entrypoints must name scripts that exist and accept every flag used.
* Dockerfiles: Ray base tag == installed ray, non-root USER, no secrets.

CRDs: ``$KUBERAY_CRDS_DIR`` or ``<repo>/infra/crds`` (KubeRay's own, copied unchanged, Apache-2.0).
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
DOCKER = INFRA / "docker"
CRDS_DIR = Path(os.environ.get("KUBERAY_CRDS_DIR") or (REPO / "infra" / "crds"))
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}
ALL_TEMPLATES = ("raycluster", "rayjob-batch-generate", "rayjob-train", "weights-pvc", "rayservice")

DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
SECRETISH = re.compile(
    r"(^|_)(AWS|SECRET|TOKEN|PASSWORD|PASSWD|ACCESS_KEY|CREDENTIALS?|API_KEY|PRIVATE_KEY)(_|$)", re.I
)


def _load_render():
    spec = importlib.util.spec_from_file_location("video2lora_infra_render", INFRA / "render.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    saved, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # keep infra/ free of __pycache__
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = saved
    return module


render = _load_render()


# ============================================================================ fixtures


@pytest.fixture(scope="module")
def values():
    return render.load_values()


@pytest.fixture(scope="module")
def rendered(values):
    return render.render(ALL_TEMPLATES, values)


@pytest.fixture(scope="module")
def cr_docs(rendered):
    return [d for docs in rendered.values() for d in docs if d.get("apiVersion") == "ray.io/v1"]


def _doc(rendered, template, kind):
    (doc,) = [d for d in rendered[template] if d["kind"] == kind]
    return doc


def _cluster_specs(docs):
    """(label, RayClusterSpec) for the RayCluster and every RayJob's embedded cluster."""
    out = []
    for d in docs:
        if d["kind"] == "RayCluster":
            out.append((d["metadata"]["name"], d["spec"]))
        elif d["kind"] == "RayJob" and d["spec"].get("rayClusterSpec"):
            out.append((d["metadata"]["name"] + ".rayClusterSpec", d["spec"]["rayClusterSpec"]))
    return out


def _groups(spec):
    yield "head", spec["headGroupSpec"]
    for g in spec.get("workerGroupSpecs", []):
        yield g["groupName"], g


# ============================================================================ CRD schema machinery


def _patch_schema(node):
    """Make a CRD structural schema usable by jsonschema.

    * ``x-kubernetes-int-or-string: true`` -> accept integer or string.
    * ``nullable: true`` -> also accept null.
    ``x-kubernetes-*`` keywords are otherwise ignored by jsonschema.
    """
    if isinstance(node, dict):
        node = {k: _patch_schema(v) for k, v in node.items()}
        if node.get("x-kubernetes-int-or-string"):
            node.pop("type", None)
            node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        if node.get("nullable") and isinstance(node.get("type"), str):
            node["type"] = [node["type"], "null"]
        return node
    if isinstance(node, list):
        return [_patch_schema(v) for v in node]
    return node


_SCHEMAS: dict[str, dict] = {}


def crd_schema(kind: str) -> dict:
    if kind not in _SCHEMAS:
        path = CRDS_DIR / CRD_FILES[kind]
        if not path.is_file():
            pytest.fail(f"KubeRay CRD not found: {path} (set KUBERAY_CRDS_DIR)")
        crd = yaml.safe_load(path.read_text())
        assert crd["spec"]["names"]["kind"] == kind
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        assert v1["served"], f"{kind} v1 not served"
        _SCHEMAS[kind] = _patch_schema(v1["schema"]["openAPIV3Schema"])
    return _SCHEMAS[kind]


def unknown_fields(inst, schema, path="") -> list[str]:
    """Fields the API server would prune/reject (strict field validation).

    An object node that declares ``properties`` (or declares nothing at all)
    and has neither ``additionalProperties`` nor
    ``x-kubernetes-preserve-unknown-fields`` accepts only declared keys.
    The root ``metadata`` (ObjectMeta, ``type: object`` in CRDs) is checked by
    ``metadata_errors`` instead.
    """
    errors: list[str] = []
    if path == ".metadata":
        return errors
    if isinstance(inst, dict):
        props = schema.get("properties") or {}
        addl = schema.get("additionalProperties")
        preserve = schema.get("x-kubernetes-preserve-unknown-fields", False)
        for key, val in inst.items():
            sub = f"{path}.{key}"
            if key in props:
                errors += unknown_fields(val, props[key], sub)
            elif isinstance(addl, dict):
                errors += unknown_fields(val, addl, sub)
            elif addl is True or preserve:
                continue
            else:
                errors.append(f"{sub}: unknown field {key!r}")
    elif isinstance(inst, list) and isinstance(schema.get("items"), dict):
        for i, val in enumerate(inst):
            errors += unknown_fields(val, schema["items"], f"{path}[{i}]")
    return errors


def unchecked_cel_rules(inst, schema, path="") -> list[str]:
    """CEL rules (x-kubernetes-validations) this offline check cannot evaluate.

    Transition rules (using ``oldSelf``) only apply on update and are ignored.
    Any other rule on a field our manifests set is reported so that nobody
    silently relies on a rule that was never checked.
    """
    out = [
        f"{path or '.'}: {r['rule']}"
        for r in schema.get("x-kubernetes-validations", [])
        if "oldSelf" not in r.get("rule", "")
    ]
    if isinstance(inst, dict):
        props = schema.get("properties") or {}
        addl = schema.get("additionalProperties")
        for key, val in inst.items():
            sub = props.get(key) or (addl if isinstance(addl, dict) else None)
            if sub:
                out += unchecked_cel_rules(val, sub, f"{path}.{key}")
    elif isinstance(inst, list) and isinstance(schema.get("items"), dict):
        for i, val in enumerate(inst):
            out += unchecked_cel_rules(val, schema["items"], f"{path}[{i}]")
    return out


def _string_map_errors(mapping, where) -> list[str]:
    errs = []
    if not isinstance(mapping, dict):
        return [f"{where}: must be a mapping"]
    for k, v in mapping.items():
        if not isinstance(k, str) or not isinstance(v, str):
            errs.append(f"{where}.{k}: keys and values must be strings, got {v!r}")
    return errs


def metadata_errors(meta, *, name_re=DNS1123_SUBDOMAIN, max_len=253) -> list[str]:
    """Hand-written ObjectMeta check (name, namespace, labels, annotations)."""
    errs = []
    if not isinstance(meta, dict):
        return ["metadata: missing"]
    allowed = {"name", "namespace", "labels", "annotations", "generateName", "finalizers"}
    errs += [f"metadata.{k}: unexpected field" for k in meta if k not in allowed]
    name = meta.get("name")
    if not isinstance(name, str) or not name_re.match(name) or len(name) > max_len:
        errs.append(f"metadata.name {name!r}: invalid (pattern {name_re.pattern}, <= {max_len} chars)")
    ns = meta.get("namespace")
    if ns is not None and (not isinstance(ns, str) or not DNS1123_LABEL.match(ns) or len(ns) > 63):
        errs.append(f"metadata.namespace {ns!r}: invalid DNS-1123 label")
    for field in ("labels", "annotations"):
        if field in meta:
            errs += _string_map_errors(meta[field], f"metadata.{field}")
    for k, v in (meta.get("labels") or {}).items():
        if isinstance(v, str) and (len(v) > 63 or not LABEL_VALUE.match(v)):
            errs.append(f"metadata.labels.{k}: invalid label value {v!r}")
    return errs


def kuberay_spec_errors(spec) -> list[str]:
    """Offline subset of KubeRay's ValidateRayClusterSpec (+ replica bounds)."""
    errs = []
    head_containers = spec["headGroupSpec"]["template"]["spec"].get("containers") or []
    if not head_containers:
        errs.append("headGroupSpec should have at least one container")
    names = set()
    for name, g in _groups(spec):
        params = g.get("rayStartParams") or {}
        if name != "head":
            if name in names:
                errs.append(f"duplicate worker groupName {name!r}")
            names.add(name)
            if not g["template"]["spec"].get("containers"):
                errs.append(f"{name}: workerGroupSpec should have at least one container")
            lo, hi = g.get("minReplicas", 0), g.get("maxReplicas", 2**31 - 1)
            if lo > hi:
                errs.append(f"{name}: minReplicas {lo} > maxReplicas {hi}")
            if "replicas" in g and not lo <= g["replicas"] <= hi:
                errs.append(f"{name}: replicas {g['replicas']} outside [{lo}, {hi}]")
        has_start_resources = any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources"))
        if has_start_resources and g.get("resources"):
            errs.append(f"{name}: resources set in both rayStartParams and resources")
        if "labels" in params:
            errs.append(f"{name}: rayStartParams['labels'] is not supported")
    env = head_containers[0].get("env", []) if head_containers else []
    if any(e.get("name") in ("RAY_REDIS_ADDRESS", "REDIS_USERNAME") for e in env) and not spec.get(
        "gcsFaultToleranceOptions"
    ):
        errs.append("Redis env set without gcsFaultToleranceOptions")
    return errs


def kuberay_job_errors(job_spec) -> list[str]:
    """Offline subset of KubeRay's ValidateRayJobSpec."""
    errs = []
    shutdown = job_spec.get("shutdownAfterJobFinishes", False)
    if job_spec.get("suspend") and not shutdown:
        errs.append("suspend requires shutdownAfterJobFinishes")
    if job_spec.get("ttlSecondsAfterFinished", 0) < 0:
        errs.append("ttlSecondsAfterFinished must be >= 0")
    if not shutdown and job_spec.get("ttlSecondsAfterFinished", 0) > 0:
        errs.append("ttlSecondsAfterFinished requires shutdownAfterJobFinishes: true")
    if not job_spec.get("rayClusterSpec") and not job_spec.get("clusterSelector"):
        errs.append("one of rayClusterSpec or clusterSelector must be set")
    mode = job_spec.get("submissionMode", "K8sJobMode")
    if mode not in ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"):
        errs.append(f"unknown submissionMode {mode!r}")
    if mode == "InteractiveMode" and job_spec.get("backoffLimit", 0) > 0:
        errs.append("backoffLimit is incompatible with InteractiveMode")
    if mode == "SidecarMode" and (job_spec.get("submitterPodTemplate") or job_spec.get("submitterConfig")):
        errs.append("SidecarMode does not support submitterPodTemplate/submitterConfig")
    if "activeDeadlineSeconds" in job_spec and job_spec["activeDeadlineSeconds"] <= 0:
        errs.append("activeDeadlineSeconds must be positive")
    if job_spec.get("backoffLimit", 0) < 0:
        errs.append("backoffLimit must be >= 0")
    if "runtimeEnvYAML" in job_spec:
        try:
            env = yaml.safe_load(job_spec["runtimeEnvYAML"])
            if env is not None and not isinstance(env, dict):
                errs.append("runtimeEnvYAML must be a mapping")
        except yaml.YAMLError as exc:
            errs.append(f"runtimeEnvYAML is not YAML: {exc}")
    if job_spec.get("rayClusterSpec"):
        errs += kuberay_spec_errors(job_spec["rayClusterSpec"])
    return errs


def validate_cr(doc) -> list[str]:
    """All offline checks for one ray.io/v1 object; returns error strings."""
    kind = doc.get("kind")
    if doc.get("apiVersion") != "ray.io/v1" or kind not in CRD_FILES:
        return [f"not a ray.io/v1 RayCluster/RayJob: {doc.get('apiVersion')}/{kind}"]
    schema = crd_schema(kind)
    validator = jsonschema.Draft7Validator(schema)
    errs = [
        f"schema: .{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]
    errs += unknown_fields(doc, schema)
    errs += [f"unchecked CEL rule at {r}" for r in unchecked_cel_rules(doc, schema)]
    max_len = {"RayCluster": render.MAX_RAYCLUSTER_NAME, "RayJob": render.MAX_RAYJOB_NAME,
               "RayService": render.MAX_RAYSERVICE_NAME}[kind]
    errs += metadata_errors(doc.get("metadata"), name_re=DNS1035, max_len=max_len)
    if "status" in doc:
        errs.append("status must not be set in a manifest")
    if errs:  # like the API server: the operator only sees schema-valid objects
        return errs
    if kind == "RayCluster":
        errs += kuberay_spec_errors(doc["spec"])
    elif kind == "RayService":
        errs += kuberay_spec_errors(doc["spec"]["rayClusterConfig"])
        try:
            if not isinstance(yaml.safe_load(doc["spec"].get("serveConfigV2", "")), dict):
                errs.append("serveConfigV2 must be the YAML text of a mapping")
        except yaml.YAMLError as exc:
            errs.append(f"serveConfigV2 is not YAML: {exc}")
    else:
        errs += kuberay_job_errors(doc["spec"])
    return errs


# ============================================================================ CRD validation


def test_crd_files_present():
    for kind, fname in CRD_FILES.items():
        assert (CRDS_DIR / fname).is_file(), f"missing {CRDS_DIR / fname} (set KUBERAY_CRDS_DIR)"
        assert crd_schema(kind)["properties"]["spec"]["properties"]


def test_default_render_has_expected_objects(rendered):
    kinds = {name: [d["kind"] for d in docs] for name, docs in rendered.items()}
    assert kinds == {
        "raycluster": ["RayCluster"],
        "rayjob-batch-generate": ["RayJob"],
        "rayjob-train": ["RayJob"],
        "weights-pvc": ["PersistentVolumeClaim", "Job"],
        "rayservice": ["RayService"],
    }


@pytest.mark.parametrize("template", ["raycluster", "rayjob-batch-generate", "rayjob-train", "rayservice"])
def test_manifest_valid_against_kuberay_crd(rendered, template):
    for doc in rendered[template]:
        errs = validate_cr(doc)
        assert not errs, f"{template}:\n  " + "\n  ".join(errs)


def test_rendered_output_has_no_template_leftovers(rendered):
    text = render.dump(d for docs in rendered.values() for d in docs)
    assert "${" not in text
    assert render.RENDER_IF not in text
    # and it round-trips through YAML exactly
    assert list(yaml.safe_load_all(text)) == [d for docs in rendered.values() for d in docs]


def _mutate(doc, path, fn):
    doc = copy.deepcopy(doc)
    node = doc
    for p in path[:-1]:
        node = node[p]
    fn(node, path[-1])
    return doc


def _rename(new):
    def fn(node, key):
        node[new] = node.pop(key)

    return fn


def _set(value):
    def fn(node, key):
        node[key] = value

    return fn


HEAD = ("spec", "headGroupSpec")
GPU_GROUP = ("spec", "workerGroupSpecs", 0)
HEAD_CONTAINER = HEAD + ("template", "spec", "containers", 0)


@pytest.mark.parametrize(
    "path, new_key, expected",
    [
        (HEAD + ("rayStartParams",), "rayStartParms", ".spec.headGroupSpec.rayStartParms"),
        (GPU_GROUP + ("minReplicas",), "minReplica", ".spec.workerGroupSpecs[0].minReplica"),
        (("spec", "enableInTreeAutoscaling"), "enableInTreeAutoscaler", ".spec.enableInTreeAutoscaler"),
        (HEAD_CONTAINER + ("volumeMounts",), "volumeMount", ".containers[0].volumeMount"),
        (HEAD + ("template", "spec", "volumes", 0, "emptyDir"), "emptydir", ".volumes[0].emptydir"),
        (HEAD_CONTAINER + ("resources", "limits"), "limit", ".resources.limit"),
    ],
)
def test_misspelled_raycluster_field_is_caught(rendered, path, new_key, expected):
    doc = _mutate(_doc(rendered, "raycluster", "RayCluster"), path, _rename(new_key))
    errs = unknown_fields(doc, crd_schema("RayCluster"))
    assert any(expected in e and "unknown field" in e for e in errs), errs
    assert validate_cr(doc)


@pytest.mark.parametrize(
    "path, new_key",
    [
        (("spec", "shutdownAfterJobFinishes"), "shutdownAfterJobFinish"),
        (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "maxReplicas"), "maxReplica"),
        (("spec", "submitterPodTemplate", "spec", "containers", 0, "image"), "img"),
    ],
)
def test_misspelled_rayjob_field_is_caught(rendered, path, new_key):
    doc = _mutate(_doc(rendered, "rayjob-batch-generate", "RayJob"), path, _rename(new_key))
    errs = unknown_fields(doc, crd_schema("RayJob"))
    assert any(e.endswith(f"unknown field {new_key!r}") for e in errs), errs


@pytest.mark.parametrize(
    "path, value, needle",
    [
        (HEAD_CONTAINER + ("resources", "limits", "cpu"), 0.5, "is not valid under any of the given schemas"),
        (HEAD_CONTAINER + ("resources", "limits", "memory"), "16GB", "does not match"),
        (GPU_GROUP + ("maxReplicas",), "4", "is not of type 'integer'"),
        (("spec", "autoscalerOptions", "upscalingMode"), "Fast", "is not one of"),
        (HEAD + ("rayStartParams", "num-gpus"), 0, "is not of type 'string'"),
        (HEAD_CONTAINER + ("ports", 0, "containerPort"), "6379", "is not of type 'integer'"),
    ],
)
def test_type_errors_are_caught(rendered, path, value, needle):
    doc = _mutate(_doc(rendered, "raycluster", "RayCluster"), path, _set(value))
    errs = validate_cr(doc)
    assert any(needle in e for e in errs), errs


def test_missing_required_field_is_caught(rendered):
    doc = _mutate(_doc(rendered, "raycluster", "RayCluster"), GPU_GROUP + ("groupName",), lambda n, k: n.pop(k))
    assert any("'groupName' is a required property" in e for e in validate_cr(doc))


def test_int_or_string_patch():
    schema = _patch_schema({"type": "object", "properties": {"q": {"x-kubernetes-int-or-string": True}}})
    v = jsonschema.Draft7Validator(schema)
    assert v.is_valid({"q": 1}) and v.is_valid({"q": "1Gi"})
    assert not v.is_valid({"q": 1.5}) and not v.is_valid({"q": [1]}) and not v.is_valid({"q": None})


def test_unknown_field_walk_semantics():
    schema = {
        "type": "object",
        "properties": {
            "strict": {"type": "object", "properties": {"a": {"type": "string"}}},
            "map": {"type": "object", "additionalProperties": {"type": "object", "properties": {"x": {}}}},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            "empty": {"type": "object"},
            "items": {"type": "array", "items": {"type": "object", "properties": {"n": {}}}},
        },
    }
    inst = {
        "strict": {"a": "ok", "b": 1},
        "map": {"k": {"x": 1, "y": 2}},
        "free": {"anything": {"goes": 1}},
        "empty": {"pruned": 1},
        "items": [{"n": 1}, {"m": 2}],
        "top": 1,
    }
    errs = sorted(e.split(":")[0] for e in unknown_fields(inst, schema))
    assert errs == [".empty.pruned", ".items[1].m", ".map.k.y", ".strict.b", ".top"]


def test_kuberay_semantic_errors_are_caught(rendered):
    cluster = _doc(rendered, "raycluster", "RayCluster")
    bad = _mutate(cluster, GPU_GROUP + ("minReplicas",), _set(99))
    assert any("minReplicas 99 > maxReplicas" in e for e in validate_cr(bad))
    bad = _mutate(cluster, GPU_GROUP + ("rayStartParams",), _set({"num-gpus": "1"}))
    bad["spec"]["workerGroupSpecs"][0]["resources"] = {"GPU": "1"}
    assert any("both rayStartParams and resources" in e for e in validate_cr(bad))
    job = _doc(rendered, "rayjob-batch-generate", "RayJob")
    bad = _mutate(job, ("spec", "shutdownAfterJobFinishes"), _set(False))
    assert any("requires shutdownAfterJobFinishes" in e for e in validate_cr(bad))
    bad = _mutate(job, ("spec", "activeDeadlineSeconds"), _set(0))
    assert any("activeDeadlineSeconds must be positive" in e for e in validate_cr(bad))
    bad = _mutate(job, ("metadata", "name"), _set("x" * 48))
    assert any("metadata.name" in e for e in validate_cr(bad))
    bad = _mutate(job, ("metadata", "name"), _set("Batch_Job"))
    assert any("metadata.name" in e for e in validate_cr(bad))


def test_cel_guarded_fields_are_reported(rendered):
    # deletionStrategy carries non-transition CEL rules we cannot evaluate offline.
    job = copy.deepcopy(_doc(rendered, "rayjob-train", "RayJob"))
    job["spec"]["deletionStrategy"] = {"deletionRules": []}
    assert any("unchecked CEL rule at .spec.deletionStrategy" in e for e in validate_cr(job))


# ============================================================================ project policy


def _containers(group):
    return group["template"]["spec"]["containers"]


def _quantity_gpus(resources) -> int:
    return int((resources or {}).get("limits", {}).get("nvidia.com/gpu", 0) or 0)


def test_cluster_policy(rendered, values):
    specs = _cluster_specs(d for docs in rendered.values() for d in docs)
    assert len(specs) == 3  # RayCluster + 2 RayJobs
    for label, spec in specs:
        assert spec["rayVersion"] == ray.__version__ == str(values["RAY_VERSION"]), label
        assert spec["enableInTreeAutoscaling"] is True, label

        head = spec["headGroupSpec"]
        assert head["rayStartParams"].get("num-gpus") == "0", f"{label}: head must advertise no GPUs"
        for c in _containers(head):
            for part in ("requests", "limits"):
                assert "nvidia.com/gpu" not in c.get("resources", {}).get(part, {}), f"{label}: GPU on head"

        gpu_groups = [g for g in spec["workerGroupSpecs"] if _quantity_gpus(_containers(g)[0].get("resources")) > 0]
        assert gpu_groups, f"{label}: no GPU worker group"
        for g in gpu_groups:
            assert {"minReplicas", "maxReplicas"} <= set(g), f"{label}: autoscaling bounds missing"
            assert g["maxReplicas"] >= 1 and g["minReplicas"] <= g["maxReplicas"]
            assert g["maxReplicas"] == values["GPU_WORKERS_MAX"]
            assert _quantity_gpus(_containers(g)[0]["resources"]) == values["GPUS_PER_WORKER"]

        for name, g in _groups(spec):
            pod = g["template"]["spec"]
            where = f"{label}/{name}"
            assert pod["securityContext"]["runAsNonRoot"] is True, where
            assert pod["securityContext"]["runAsUser"] != 0, where
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            ray_c = pod["containers"][0]
            assert ray_c["image"] == values["IMAGE"], where
            assert ray_c["workingDir"] == values["APP_DIR"], where
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(ray_c["resources"][part]), f"{where}: {part}"
            mounts = {m["mountPath"]: m for m in ray_c.get("volumeMounts", [])}
            shm = mounts.get("/dev/shm")
            assert shm, f"{where}: /dev/shm not mounted"
            assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory", where
            # model weights: read-only PVC (volume and mount)
            pvc_vols = [v for v in volumes.values() if "persistentVolumeClaim" in v]
            assert [v["persistentVolumeClaim"]["claimName"] for v in pvc_vols] == [values["WEIGHTS_PVC"]], where
            for v in pvc_vols:
                assert v["persistentVolumeClaim"]["readOnly"] is True, where
                (m,) = [m for m in mounts.values() if m["name"] == v["name"]]
                assert m["readOnly"] is True and m["mountPath"] == values["WEIGHTS_MOUNT_PATH"], where
            # S3 credentials only from the Secret
            env = {e["name"]: e for e in ray_c.get("env", [])}
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                ref = env[key]["valueFrom"]["secretKeyRef"]
                assert ref["name"] == values["S3_SECRET_NAME"] and ref["key"] == key, where
                assert not ref.get("optional", False), where
            assert env["AWS_ENDPOINT_URL"]["valueFrom"]["secretKeyRef"]["optional"] is True, where
            for e in env.values():
                if SECRETISH.search(e["name"]):
                    assert "value" not in e, f"{where}: {e['name']} must come from a Secret"


def test_rayjobs_run_on_the_raycluster_spec(rendered):
    cluster = _doc(rendered, "raycluster", "RayCluster")
    for template in ("rayjob-batch-generate", "rayjob-train"):
        job = _doc(rendered, template, "RayJob")
        assert job["spec"]["rayClusterSpec"] == cluster["spec"], template
        assert "clusterSelector" not in job["spec"]
        assert job["spec"]["shutdownAfterJobFinishes"] is True
        assert job["spec"]["ttlSecondsAfterFinished"] > 0
        assert job["spec"]["backoffLimit"] >= 1, f"{template}: retries expected (jobs resume)"
        assert job["spec"]["activeDeadlineSeconds"] > 0
        assert job["spec"]["submissionMode"] == "K8sJobMode"
        sub = job["spec"]["submitterPodTemplate"]["spec"]
        assert sub["restartPolicy"] == "Never" and sub["securityContext"]["runAsNonRoot"] is True
        assert not sub["containers"][0].get("command"), "KubeRay fills in the submitter command"


def test_rayservice_serves_the_app_on_the_raycluster_spec(rendered, values):
    """The RayService runs pipelines.serve:build_app with the values' settings, on raycluster.yaml's spec, and the
    head exposes Serve's port."""
    import importlib

    from pipelines.config import ServeConfig

    service = _doc(rendered, "rayservice", "RayService")
    assert service["spec"]["rayClusterConfig"] == _doc(rendered, "raycluster", "RayCluster")["spec"]
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"containerPort": 8000, "name": "serve"} in head["ports"]
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    module, attr = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), attr)) and app["route_prefix"] == "/"
    cfg = ServeConfig.from_args(app["args"])  # the app's own parser takes the rendered settings
    assert (cfg.backbone, cfg.checkpoint) == (values["BACKBONE_URI"], values["CHECKPOINT_URI"])
    assert (cfg.batch_size, cfg.generator_max_replicas, cfg.generator_num_gpus) == (
        values["SERVE_BATCH_SIZE"], values["SERVE_GENERATOR_MAX_REPLICAS"], values["SERVE_GENERATOR_NUM_GPUS"])
    assert cfg.generation.steps == values["SERVE_STEPS"] and cfg.generation.step_cache == values["STEP_CACHE"]
    assert cfg.generation.compile_blocks is (values["COMPILE_BLOCKS"] == "on")
    from video2lora.backbones.step_cost import step_options
    from video2lora.config import GenerationConfig

    # auto: the chosen cache's measured setting, as the library's own default
    assert step_options(cfg.generation) == step_options(GenerationConfig()) == (4, (100, 800), 0.3)
    assert cfg.reference_uri_prefixes == (values["BUCKET"] + "/",)
    with pytest.raises(render.RenderError, match="SERVE_GENERATOR_MAX_REPLICAS"):
        render.render(["rayservice"], {**values, "SERVE_GENERATOR_MAX_REPLICAS": 99})


def test_batch_job_is_documented_idempotent():
    text = (K8S / "rayjob-batch-generate.yaml").read_text()
    assert "IDEMPOTENT" in text and "resume" in text


# ============================================================================ entrypoints


def _rayjobs(rendered):
    return [(n, d) for n, docs in rendered.items() for d in docs if d["kind"] == "RayJob"]


def test_entrypoints_parse(rendered, values):
    jobs = dict(_rayjobs(rendered))
    argv = shlex.split(jobs["rayjob-batch-generate"]["spec"]["entrypoint"])
    assert argv[:3] == ["python", "jobs/batch_generate.py", values["MANIFEST_URI"]]
    opts = dict(zip(argv[3::2], argv[4::2]))
    assert opts == {
        "--output": values["OUTPUT_URI"],
        "--checkpoint": values["CHECKPOINT_URI"],
        "--backbone": values["BACKBONE_URI"],
        "--num-gen-actors": str(values["NUM_GEN_ACTORS"]),
        "--gen-num-gpus": str(values["GEN_NUM_GPUS"]),
        "--num-hyper-actors": str(values["NUM_HYPER_ACTORS"]),
        "--hyper-num-gpus": str(values["HYPER_NUM_GPUS"]),
        "--step-cache": values["STEP_CACHE"],
        "--step-cache-interval": str(values["STEP_CACHE_INTERVAL"]),
        "--step-cache-threshold": str(values["STEP_CACHE_THRESHOLD"]),
        "--compile-blocks": values["COMPILE_BLOCKS"],
        "--fuse-qkv": values["FUSE_QKV"],
        "--refine-steps": str(values["REFINE_STEPS"]),
        "--refine-steps-unfamiliar": values["REFINE_STEPS_UNFAMILIAR"],
    }
    # the job's own parser takes the rendered arguments (a YAML scalar such as off must not turn into false)
    from jobs.batch_generate import parse_args
    from pipelines.config import step_cost_overrides

    from video2lora.backbones.step_cost import step_options
    from video2lora.config import GenerationConfig

    got = step_cost_overrides(parse_args(argv[2:]))
    assert values["STEP_CACHE_INTERVAL"] == values["STEP_CACHE_THRESHOLD"] == "auto"  # unset: the cache's own
    assert got == {"step_cache": values["STEP_CACHE"], "compile_blocks": values["COMPILE_BLOCKS"] == "on",
                   "fuse_qkv": values["FUSE_QKV"] == "on"}
    shipped = GenerationConfig()  # the values' per-run default is the library's measured default
    assert values["STEP_CACHE"] == shipped.step_cache
    assert parse_args(argv[2:]).refine_steps == values["REFINE_STEPS"] == shipped.refine_steps
    assert parse_args(argv[2:]).refine_steps_unfamiliar is shipped.refine_steps_unfamiliar is None
    assert step_options(dataclasses.replace(shipped, **got)) == step_options(shipped)
    first_block = parse_args(argv[2:] + ["--step-cache", "first_block"])  # another cache: its own measured setting
    assert step_options(dataclasses.replace(shipped, **step_cost_overrides(first_block)))[2] == 0.4
    # what the job asks for adds up to the GPU worker group's capacity
    gpus = values["NUM_GEN_ACTORS"] * values["GEN_NUM_GPUS"] + values["NUM_HYPER_ACTORS"] * values["HYPER_NUM_GPUS"]
    assert gpus <= values["GPU_WORKERS_MAX"] * values["GPUS_PER_WORKER"]
    argv = shlex.split(jobs["rayjob-train"]["spec"]["entrypoint"])
    assert argv[:2] == ["python", "jobs/train.py"] and "--use-gpu" in argv
    for flag, key in [("--manifest", "TRAIN_MANIFEST_URI"), ("--backbone", "BACKBONE_URI"),
                      ("--storage-path", "TRAIN_STORAGE_PATH"), ("--output", "TRAIN_OUTPUT_URI"),
                      ("--num-workers", "TRAIN_NUM_WORKERS")]:
        assert argv[argv.index(flag) + 1] == str(values[key])


@pytest.mark.parametrize("template", ["rayjob-batch-generate", "rayjob-train"])
def test_entrypoint_script_accepts_flags(rendered, values, template):
    """The script exists in the repo (= APP_DIR in the image) and knows every flag.

    Deliberately NOT skipped when the script is missing: a RayJob pointing at a
    non-existent script must fail CI.
    """
    (job,) = [d for n, d in _rayjobs(rendered) if n == template]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] in ("python", "python3"), argv
    script = argv[1]
    assert not os.path.isabs(script), "entrypoint scripts are relative to APP_DIR (the repo root)"
    path = REPO / script
    assert path.is_file(), f"{template}: entrypoint script {script} does not exist in the repo"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, str(path), "--help"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"{script} --help failed:\n{proc.stderr[-3000:]}"
    assert [a for a in argv[2:] if a.startswith("--")]
    missing = flags_missing_from_help(argv[2:], proc.stdout)
    assert not missing, f"{script} --help does not list {missing}"


def flags_missing_from_help(args, help_text) -> list[str]:
    """``--flag`` / ``--flag=value`` tokens of ``args`` that ``help_text`` does not list."""
    flags = [a.split("=", 1)[0] for a in args if a.startswith("--")]
    return [f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", help_text)]


def test_flags_missing_from_help():
    help_text = "usage: x [--output OUTPUT] [--use-gpu]\n  --num-workers N  workers\n  --output-dir D"
    args = ["s3://m", "--output", "s3://o", "--use-gpu", "--num-workers=4", "--output-di", "--gpu", "-v"]
    assert flags_missing_from_help(args, help_text) == ["--output-di", "--gpu"]


# ============================================================================ renderer


def _run_render(*args, **kw):
    return subprocess.run(
        [sys.executable, str(INFRA / "render.py"), *args], cwd=REPO, capture_output=True, text=True, timeout=120, **kw
    )


def test_render_cli_all_to_stdout():
    proc = _run_render("all")
    assert proc.returncode == 0, proc.stderr
    docs = list(yaml.safe_load_all(proc.stdout))
    assert [(d["kind"], d["metadata"]["name"]) for d in docs] == [
        ("RayCluster", "video2lora-cluster"),
        ("RayJob", "video2lora-batch-generate"),
        ("RayJob", "video2lora-train"),
    ]


def test_render_cli_out_dir(tmp_path):
    proc = _run_render("all", "weights-pvc", "-o", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    kust = yaml.safe_load((tmp_path / "kustomization.yaml").read_text())
    assert kust["resources"] == [
        "raycluster.yaml", "rayjob-batch-generate.yaml", "rayjob-train.yaml", "weights-pvc.yaml"
    ]
    assert all((tmp_path / r).is_file() for r in kust["resources"])
    assert not any("secret" in r for r in kust["resources"]), "the Secret is never rendered"


def test_render_cli_requires_template_and_rejects_unknown():
    assert _run_render().returncode != 0
    proc = _run_render("raycluster", "--set", "GPU_WORKER_MAX=8")  # typo
    assert proc.returncode == 2 and "unknown value 'GPU_WORKER_MAX'" in proc.stderr
    proc = _run_render("secret-example")
    assert proc.returncode == 2 and "unknown template" in proc.stderr


def test_values_file_merge_and_set(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("BUCKET: s3://other-bucket\nGPU_WORKERS_MAX: 8\n")
    v = render.load_values([f], ["NUM_GEN_ACTORS=8", "IMAGE=reg.local:5000/v2l:dev"])
    assert v["OUTPUT_URI"] == "s3://other-bucket/outputs/batch-001"  # reference re-resolved
    assert v["NUM_GEN_ACTORS"] == 8 and v["IMAGE"] == "reg.local:5000/v2l:dev"
    out = render.render(["all"], v)
    for _, spec in _cluster_specs(d for docs in out.values() for d in docs):
        assert spec["workerGroupSpecs"][0]["maxReplicas"] == 8
        assert spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] == "reg.local:5000/v2l:dev"
    bad = tmp_path / "bad.yaml"
    bad.write_text("IMAGES: x\n")
    with pytest.raises(render.RenderError, match="unknown value 'IMAGES'"):
        render.load_values([bad])


def test_s3_backbone_without_pvc(values):
    v = render.load_values(overrides={"WEIGHTS_PVC": "", "BACKBONE_URI": "s3://b/CogVideoX-5b"})
    out = render.render(["all"], v)
    for doc in (d for docs in out.values() for d in docs):
        assert not validate_cr(doc)
        text = render.dump([doc])
        assert "model-weights" not in text and "persistentVolumeClaim" not in text
    with pytest.raises(render.RenderError, match="BACKBONE_URI"):
        render.render(["all"], render.load_values(overrides={"WEIGHTS_PVC": ""}))
    with pytest.raises(render.RenderError, match="weights-pvc"):
        render.render(["weights-pvc"], v)


def test_no_secret_env_for_workload_identity():
    v = render.load_values(overrides={"S3_SECRET_NAME": "", "SERVICE_ACCOUNT": "v2l-irsa"})
    out = render.render(["raycluster"], v)
    (doc,) = out["raycluster"]
    assert not validate_cr(doc)
    for _, g in _groups(doc["spec"]):
        pod = g["template"]["spec"]
        assert pod["serviceAccountName"] == "v2l-irsa"
        assert not [e for e in pod["containers"][0]["env"] if e["name"].startswith("AWS_")]


def test_capacity_and_bounds_checks():
    with pytest.raises(render.RenderError, match="NUM_GEN_ACTORS"):
        render.render(["rayjob-batch-generate"], render.load_values(overrides={"NUM_GEN_ACTORS": 5}))
    with pytest.raises(render.RenderError, match="TRAIN_NUM_WORKERS"):
        render.render(["rayjob-train"], render.load_values(overrides={"TRAIN_NUM_WORKERS": 5}))
    with pytest.raises(render.RenderError, match="GPU_WORKERS_MIN"):
        render.render(["raycluster"], render.load_values(overrides={"GPU_WORKERS_MIN": 9}))
    with pytest.raises(render.RenderError, match="DNS-1035"):
        render.render(["rayjob-train"], render.load_values(overrides={"TRAIN_JOB_NAME": "Train_Job"}))
    ok = render.load_values(overrides={"GPUS_PER_WORKER": 8, "GPU_WORKERS_MAX": 2, "NUM_GEN_ACTORS": 16})
    render.render(["all"], ok)


def test_entrypoint_quoting_and_extra_args():
    v = render.load_values(
        overrides={"MANIFEST_URI": "s3://b/my manifest;rm -rf.jsonl", "BATCH_EXTRA_ARGS": "--export-loras --steps 50"}
    )
    (job,) = render.render(["rayjob-batch-generate"], v)["rayjob-batch-generate"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[2] == "s3://b/my manifest;rm -rf.jsonl"
    assert argv[-3:] == ["--export-loras", "--steps", "50"]


def test_render_rules():
    lookup = {"A": "x", "N": 3, "L": [1, 2], "E": "", "Z": None}.__getitem__
    node = {
        "whole": "${N}",
        "list": "${L}",
        "inner": "a-${A}-${N}",
        "literal": "$${A}",
        "gone": "${Z}",
        "items": [{"x-render-if": "E", "k": 1}, {"x-render-if": "A", "k": 2}],
        "entrypoint": "run ${A} ${A}",
    }
    out = render._render_node(node, lookup)
    assert out == {
        "whole": 3, "list": [1, 2], "inner": "a-x-3", "literal": "${A}",
        "items": [{"k": 2}], "entrypoint": "run x x",
    }
    with pytest.raises(render.RenderError, match="cyclic"):
        render.resolve_values({"A": "${B}", "B": "${A}"})
    with pytest.raises(render.RenderError, match="unknown"):
        render.resolve_values({"A": "${NOPE}"})
    with pytest.raises(render.RenderError, match="inside a string"):
        render._render_node({"s": "x-${L}"}, lookup)


def test_storage_class_null_is_omitted():
    (pvc, _) = render.render(["weights-pvc"], render.load_values())["weights-pvc"]
    assert "storageClassName" not in pvc["spec"]
    v = render.load_values(overrides=["WEIGHTS_STORAGE_CLASS=efs-sc"])
    (pvc, _) = render.render(["weights-pvc"], v)["weights-pvc"]
    assert pvc["spec"]["storageClassName"] == "efs-sc"


def test_values_file_documents_every_value():
    text = (K8S / "values.yaml").read_text()
    assert text.lstrip().startswith("#"), "values.yaml starts with its documentation"
    used = set()
    for f in K8S.glob("*.yaml"):  # placeholders in the YAML data, not in comments
        data = yaml.safe_dump_all(list(yaml.safe_load_all(f.read_text())))
        used |= set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)\}", data))
    raw = yaml.safe_load(text)
    assert used - set(render.DERIVED) <= set(raw), used - set(raw)
    assert str(raw["RAY_VERSION"]) == ray.__version__


# ============================================================================ core objects


def core_object_errors(doc) -> list[str]:
    """Small hand-written check for the core objects we ship."""
    errs = []
    api, kind = doc.get("apiVersion"), doc.get("kind")
    expected_api = {"Secret": "v1", "PersistentVolumeClaim": "v1", "Job": "batch/v1"}
    if kind not in expected_api or api != expected_api[kind]:
        return [f"unexpected {api}/{kind}"]
    errs += metadata_errors(doc.get("metadata"))
    if kind == "Secret":
        errs += [f"unexpected field {k}" for k in doc if k not in {"apiVersion", "kind", "metadata", "type",
                                                                   "data", "stringData", "immutable"}]
        if "stringData" in doc:
            errs += _string_map_errors(doc["stringData"], "stringData")
        if "data" in doc:
            errs += _string_map_errors(doc["data"], "data")
            errs += [f"data.{k}: not base64" for k, v in doc["data"].items()
                     if isinstance(v, str) and not re.fullmatch(r"[A-Za-z0-9+/]*={0,2}", v)]
        for k in {**doc.get("data", {}), **doc.get("stringData", {})}:
            if not re.fullmatch(r"[-._a-zA-Z0-9]+", k):
                errs.append(f"invalid Secret key {k!r}")
    elif kind == "PersistentVolumeClaim":
        spec = doc.get("spec", {})
        modes = {"ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"}
        if not spec.get("accessModes") or not set(spec["accessModes"]) <= modes:
            errs.append(f"accessModes {spec.get('accessModes')}")
        if not isinstance(spec.get("resources", {}).get("requests", {}).get("storage"), str):
            errs.append("resources.requests.storage missing")
    elif kind == "Job":
        pod = doc.get("spec", {}).get("template", {}).get("spec", {})
        if pod.get("restartPolicy") not in ("Never", "OnFailure"):
            errs.append("Job pods need restartPolicy Never/OnFailure")
        vols = {v["name"] for v in pod.get("volumes", [])}
        for c in pod.get("containers", []):
            errs += [f"mount {m['name']} has no volume" for m in c.get("volumeMounts", []) if m["name"] not in vols]
            if not c.get("image"):
                errs.append("container without image")
        if not pod.get("containers"):
            errs.append("no containers")
    return errs


def test_secret_example():
    text = (K8S / "secret-example.yaml").read_text()
    (doc,) = list(yaml.safe_load_all(text))
    assert not core_object_errors(doc), core_object_errors(doc)
    assert doc["kind"] == "Secret" and doc["type"] == "Opaque"
    defaults = render.load_values()
    assert doc["metadata"]["name"] == defaults["S3_SECRET_NAME"]
    assert doc["metadata"]["namespace"] == defaults["NAMESPACE"]
    for key, val in doc["stringData"].items():
        assert "REPLACE-ME" in val and "EXAMPLE" in val, f"{key}: must be an obviously fake value"
    assert not re.search(r"AKIA[0-9A-Z]{16}", text), "looks like a real AWS key"
    # every non-optional secretKeyRef used by the manifests exists in the example
    rendered = render.render(list(render.TEMPLATES), defaults)

    def refs(node):
        if isinstance(node, dict):
            if "secretKeyRef" in node:
                yield node["secretKeyRef"]
            for v in node.values():
                yield from refs(v)
        elif isinstance(node, list):
            for v in node:
                yield from refs(v)

    for ref in refs(rendered):
        assert ref["name"] == doc["metadata"]["name"]
        if not ref.get("optional"):
            assert ref["key"] in doc["stringData"], ref
        else:
            assert ref["key"] in text, f"document optional key {ref['key']} in the example"
    assert "secret-example" not in render.TEMPLATES


def test_weights_pvc_objects(rendered, values):
    pvc, job = rendered["weights-pvc"]
    for doc in (pvc, job):
        assert not core_object_errors(doc), core_object_errors(doc)
    assert pvc["metadata"]["name"] == values["WEIGHTS_PVC"]
    claims = [v["persistentVolumeClaim"]["claimName"] for v in job["spec"]["template"]["spec"]["volumes"]
              if "persistentVolumeClaim" in v]
    assert claims == [values["WEIGHTS_PVC"]]
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["WEIGHTS_DEST"]["value"] == values["BACKBONE_URI"]
    compile(job["spec"]["template"]["spec"]["containers"][0]["args"][0], "weights-download", "exec")


# ============================================================================ docker


def parse_dockerfile(path: Path):
    """-> (global ARG defaults, [(instruction, args)]) with continuations joined."""
    lines, buf = [], ""
    for raw in path.read_text().splitlines():
        s = raw.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        if buf and s.startswith("#"):
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        lines.append(buf + s)
        buf = ""
    instructions = []
    for line in lines:
        op, _, rest = line.partition(" ")
        instructions.append((op.upper(), rest.strip()))
    global_args = {}
    for op, rest in instructions:
        if op == "FROM":
            break
        if op == "ARG":
            k, _, v = rest.partition("=")
            global_args[k] = v.strip('"')
    return global_args, instructions


def _expand(text, args):
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), text)


def _final_stage(instructions):
    idx = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    return instructions[idx:]


@pytest.mark.parametrize("flavour, accel", [("gpu", r"cu\d{3}"), ("cpu", "cpu")])
def test_dockerfile(flavour, accel):
    path = DOCKER / f"Dockerfile.{flavour}"
    global_args, instructions = parse_dockerfile(path)
    final = _final_stage(instructions)
    image = _expand(final[0][1].split()[0], global_args)
    repo, _, tag = image.partition(":")
    assert repo == "rayproject/ray", image
    m = re.fullmatch(rf"(\d+\.\d+\.\d+)-(py3\d+)-({accel})", tag)
    assert m, f"unexpected base tag {tag!r}"
    assert m.group(1) == ray.__version__, f"base image Ray {m.group(1)} != installed ray {ray.__version__}"
    assert m.group(2) == "py311"

    # torch from the index that matches the base image's accelerator
    stage_args = dict(global_args)
    for op, rest in final:
        if op == "ARG" and "=" in rest:
            k, _, v = rest.partition("=")
            stage_args[k] = v.strip('"')
    assert stage_args["TORCH_INDEX_URL"].rstrip("/").endswith("/" + m.group(3)), stage_args["TORCH_INDEX_URL"]
    assert re.match(r"2\.13(\.|$)", stage_args["TORCH_VERSION"])
    runs = " ".join(rest for op, rest in final if op == "RUN")
    assert '--index-url "${TORCH_INDEX_URL}"' in runs and "torch==${TORCH_VERSION}" in runs
    assert re.search(r"pip install [^&]*\s\.(\s|$)", runs), "the project itself is pip-installed"
    assert "constraints" in runs, "torch/ray pinned while installing the project"

    # non-root in the final stage
    users = [rest for op, rest in final if op == "USER"]
    assert users, "no USER in the final stage"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users[-1]

    # no secrets in ARG/ENV, no secret files copied explicitly
    for op, rest in instructions:
        if op in ("ARG", "ENV"):
            names = re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)(?==|\s|$)", rest)
            assert not [n for n in names if SECRETISH.search(n)], f"{op} {rest}"
        if op in ("COPY", "ADD"):
            assert not re.search(r"\.env|\.pem|credentials|\.aws", rest), f"{op} {rest}"
        assert not re.search(r"AKIA[0-9A-Z]{16}", rest)


def test_dockerfiles_agree_with_values():
    values = render.load_values()
    for flavour in ("gpu", "cpu"):
        global_args, instructions = parse_dockerfile(DOCKER / f"Dockerfile.{flavour}")
        assert global_args["RAY_VERSION"] == str(values["RAY_VERSION"])
        workdirs = [_expand(rest, {"APP_DIR": values["APP_DIR"]}) for op, rest in instructions if op == "WORKDIR"]
        assert workdirs[-1] == values["APP_DIR"], "entrypoints run relative to APP_DIR"
        env = " ".join(rest for op, rest in instructions if op == "ENV")
        assert f"APP_DIR={values['APP_DIR']}" in env


def _ignored(pattern_lines, rel: str) -> bool:
    """Approximation of Docker's ignore matching (last matching pattern wins)."""
    ignored = False
    for pat in pattern_lines:
        neg = pat.startswith("!")
        p = pat[1:] if neg else pat
        cands = [p, p.replace("**/", "")]
        parts = rel.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(x, c) for c in cands for x in prefixes + parts):
            ignored = not neg
    return ignored


def test_dockerignore():
    files = [DOCKER / "Dockerfile.gpu.dockerignore", DOCKER / "Dockerfile.cpu.dockerignore"]
    texts = [f.read_text() for f in files]
    assert texts[0] == texts[1], "keep the two dockerignore files identical"
    pats = [ln.strip() for ln in texts[0].splitlines() if ln.strip() and not ln.strip().startswith("#")]
    for must in (".git", ".env", "*.pem", "outputs", "**/__pycache__", "**/.cache", "**/credentials"):
        assert must in pats, f"dockerignore lacks {must}"
    for secret in (".env", "sub/.env.local", "keys/tls.pem", "home/.aws/credentials", ".git/config",
                   "outputs/run1/video.mp4", "video2lora/__pycache__/x.pyc"):
        assert _ignored(pats, secret), secret
    for needed in ("pyproject.toml", "README.md", "video2lora/__init__.py", "pipelines/__init__.py",
                   "jobs/batch_generate.py", "jobs/train.py"):
        assert not _ignored(pats, needed), f"dockerignore would drop {needed}"


# ============================================================================ docs


def test_readme_covers_the_deployment():
    text = (INFRA / "README.md").read_text()
    for needle in (r"helm install kuberay-operator", r"infra/render\.py", r"values\.yaml", r"port-forward svc/",
                   r"8265", r"ray job logs", r"kubectl( -n \S+)? logs", r"create secret", r"rayjob-train",
                   r"resume", r"Dockerfile\.gpu", r"s3://", r"results\.parquet"):
        assert re.search(needle, text), needle


def test_every_ray_pod_is_scraped_by_prometheus_only_while_enabled(values):
    """PROMETHEUS_SCRAPE on: every Ray pod of the RayCluster and of every RayJob/RayService carries the
    prometheus.io annotations, pointing at the port Ray exports its metrics on; off: none of them does."""
    for scrape in (True, False):
        docs = [d for ds in render.render(ALL_TEMPLATES, {**values, "PROMETHEUS_SCRAPE": scrape}).values() for d in ds
                if d.get("apiVersion") == "ray.io/v1"]
        specs = _cluster_specs(docs) + [(d["metadata"]["name"], d["spec"]["rayClusterConfig"]) for d in docs
                                        if d["kind"] == "RayService"]
        assert specs
        for label, spec in specs:
            for group, g in _groups(spec):
                notes = g["template"]["metadata"].get("annotations") or {}
                if scrape:
                    assert notes.get("prometheus.io/scrape") == "true", (label, group)
                    assert notes.get("prometheus.io/port") == g["rayStartParams"]["metrics-export-port"], (label, group)
                else:
                    assert not any(k.startswith("prometheus.io/") for k in notes), (label, group)
