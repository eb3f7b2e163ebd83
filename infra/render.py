#!/usr/bin/env python3
"""Render the KubeRay manifests in infra/k8s/ with the values in infra/k8s/values.yaml.

    python infra/render.py rayjob-batch-generate | kubectl apply -f -
    python infra/render.py all -f my-values.yaml --set GPU_WORKERS_MAX=8 -o rendered/
    python infra/render.py --print-values [-f my-values.yaml]

Templates are plain YAML with three rules (pure Python + PyYAML, no kustomize/helm):

* ``${NAME}`` as a whole scalar is replaced by the value *with its type*
  (int, list, mapping...); inside a longer string it is replaced by its text.
  In a field named ``entrypoint`` values are shell-quoted (``shlex.quote``),
  except names ending in ``_ARGS`` which are inserted verbatim (extra CLI flags).
  ``$${`` is a literal ``${``.
* A mapping with ``x-render-if: NAME`` is dropped when NAME is empty/false/null
  (the key itself is removed otherwise).  A ``key: ${NAME}`` whose value is
  null is omitted.
* ``${RAYCLUSTER_SPEC}`` is the rendered ``spec`` of raycluster.yaml, so the
  RayJobs run on exactly the cluster described there.

Values files may reference other values (``OUTPUT_URI: ${BUCKET}/outputs``).
``-f`` files and ``--set`` may only set keys that exist in values.yaml.
"""

from __future__ import annotations

import argparse
import copy
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

INFRA_DIR = Path(__file__).resolve().parent
K8S_DIR = INFRA_DIR / "k8s"
DEFAULT_VALUES = K8S_DIR / "values.yaml"

# template name -> file; "all" renders the DEFAULT_SET (weights-pvc and the
# Secret example are applied separately, on purpose).
TEMPLATES = {
    "raycluster": "raycluster.yaml",
    "rayjob-batch-generate": "rayjob-batch-generate.yaml",
    "rayjob-train": "rayjob-train.yaml",
    "weights-pvc": "weights-pvc.yaml",
    "rayservice": "rayservice.yaml",
}
DEFAULT_SET = ("raycluster", "rayjob-batch-generate", "rayjob-train")
DERIVED = ("RAYCLUSTER_SPEC",)

RENDER_IF = "x-render-if"
_NAME = r"[A-Z][A-Z0-9_]*"
_PLACEHOLDER = re.compile(r"\$\$\{|\$\{(" + _NAME + r")\}")
_WHOLE = re.compile(r"^\$\{(" + _NAME + r")\}$")
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_RAYCLUSTER_NAME = 53  # KubeRay: 63 - len("-serve-svc")
MAX_RAYJOB_NAME = 47  # KubeRay appends "-xxxxx" for the RayJob's cluster
MAX_RAYSERVICE_NAME = 40  # KubeRay names its cluster "<name>-raycluster-xxxxx" (a 63-char label with room to spare)
SERVE_CONFIG_KEY = "serveConfigV2"  # a mapping in the template, the YAML text KubeRay expects once rendered

_DROP = object()


class RenderError(ValueError):
    """Bad values or template."""


# ----------------------------------------------------------------------------- values


def _read_yaml_mapping(path: Path) -> dict:
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise RenderError(f"{path}: expected a mapping of NAME: value")
    return data


def parse_set(item: str) -> tuple[str, Any]:
    """``KEY=VALUE`` -> (KEY, VALUE parsed as YAML; empty VALUE -> "")."""
    if "=" not in item:
        raise RenderError(f"--set expects KEY=VALUE, got {item!r}")
    key, raw = item.split("=", 1)
    key = key.strip()
    if raw.strip() == "":
        return key, ""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return key, value


def _fmt_scalar(value: Any, name: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None or isinstance(value, (dict, list)):
        raise RenderError(f"${{{name}}} is used inside a string but its value is {value!r}")
    return str(value)


def _sub_string(text: str, lookup, quote: bool = False) -> Any:
    """Substitute placeholders in ``text``; ``lookup(name)`` returns the value."""
    whole = _WHOLE.match(text)
    if whole:
        return copy.deepcopy(lookup(whole.group(1)))

    def repl(m: re.Match) -> str:
        if m.group(0) == "$${":
            return "${"
        name = m.group(1)
        s = _fmt_scalar(lookup(name), name)
        if quote and not name.endswith("_ARGS"):
            return shlex.quote(s)
        return s

    return _PLACEHOLDER.sub(repl, text)


def resolve_values(raw: Mapping[str, Any]) -> dict:
    """Resolve ``${OTHER}`` references between values (cycles are an error)."""
    done: dict[str, Any] = {}
    active: list[str] = []

    def lookup(name: str) -> Any:
        if name in done:
            return done[name]
        if name not in raw:
            raise RenderError(f"value references unknown ${{{name}}}")
        if name in active:
            raise RenderError("cyclic values: " + " -> ".join(active + [name]))
        active.append(name)
        done[name] = _walk_value(raw[name], lookup)
        active.pop()
        return done[name]

    for key in raw:
        lookup(key)
    return done


def _walk_value(node: Any, lookup) -> Any:
    if isinstance(node, str):
        return _sub_string(node, lookup)
    if isinstance(node, list):
        return [_walk_value(v, lookup) for v in node]
    if isinstance(node, dict):
        return {k: _walk_value(v, lookup) for k, v in node.items()}
    return node


def load_values(
    files: Iterable[str | Path] = (),
    overrides: Mapping[str, Any] | Iterable[str] | None = None,
    defaults: str | Path = DEFAULT_VALUES,
) -> dict:
    """Defaults, then each ``-f`` file, then ``--set`` overrides; resolved."""
    raw = _read_yaml_mapping(Path(defaults))
    for key in raw:
        if key in DERIVED or not re.fullmatch(_NAME, str(key)):
            raise RenderError(f"{defaults}: invalid value name {key!r}")
    for f in files:
        for key, value in _read_yaml_mapping(Path(f)).items():
            if key not in raw:
                raise RenderError(f"{f}: unknown value {key!r} (not in {Path(defaults).name})")
            raw[key] = value
    if overrides is not None:
        items = overrides.items() if isinstance(overrides, Mapping) else map(parse_set, overrides)
        for key, value in items:
            if key not in raw:
                raise RenderError(f"--set: unknown value {key!r} (not in {Path(defaults).name})")
            raw[key] = value
    return resolve_values(raw)


# ----------------------------------------------------------------------------- checks


def _is_local(uri: str) -> bool:
    return "://" not in str(uri)


def check_values(values: Mapping[str, Any], templates: Iterable[str]) -> None:
    """Catch value combinations that would only fail inside the cluster."""
    templates = set(templates)
    errors: list[str] = []

    def num(name: str) -> float:
        v = values[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            errors.append(f"{name} must be a number, got {v!r}")
            return 0
        return v

    for lo, hi in (("GPU_WORKERS_MIN", "GPU_WORKERS_MAX"), ("CPU_WORKERS_MIN", "CPU_WORKERS_MAX")):
        if num(lo) < 0 or num(lo) > num(hi):
            errors.append(f"need 0 <= {lo} <= {hi} (got {values[lo]}, {values[hi]})")
    capacity = num("GPU_WORKERS_MAX") * num("GPUS_PER_WORKER")
    if num("GPUS_PER_WORKER") < 1 or int(num("GPUS_PER_WORKER")) != num("GPUS_PER_WORKER"):
        errors.append("GPUS_PER_WORKER must be a positive integer")
    if "rayjob-batch-generate" in templates:
        need = num("NUM_GEN_ACTORS") * num("GEN_NUM_GPUS") + num("NUM_HYPER_ACTORS") * num("HYPER_NUM_GPUS")
        if need > capacity:
            errors.append(f"NUM_GEN_ACTORS*GEN_NUM_GPUS + NUM_HYPER_ACTORS*HYPER_NUM_GPUS={need} GPUs > "
                          f"GPU_WORKERS_MAX*GPUS_PER_WORKER={capacity}")
        if num("GEN_NUM_GPUS") > 0.5 and num("NUM_GEN_ACTORS") > capacity:  # each needs a GPU of its own
            errors.append(f"NUM_GEN_ACTORS={values['NUM_GEN_ACTORS']} actors of GEN_NUM_GPUS={values['GEN_NUM_GPUS']} "
                          f"need a GPU each > GPU_WORKERS_MAX*GPUS_PER_WORKER={capacity}")
    if "rayservice" in templates:  # the autoscaled maximum must fit the GPU workers, one GPU (share) per replica
        per_gpu = 1 if num("SERVE_GENERATOR_NUM_GPUS") > 0.5 else max(1, int(1 / max(num("SERVE_GENERATOR_NUM_GPUS"), 1e-9)))
        if num("SERVE_GENERATOR_NUM_GPUS") > 0 and num("SERVE_GENERATOR_MAX_REPLICAS") > capacity * per_gpu:
            errors.append(f"SERVE_GENERATOR_MAX_REPLICAS={values['SERVE_GENERATOR_MAX_REPLICAS']} generator replicas "
                          f"of SERVE_GENERATOR_NUM_GPUS={values['SERVE_GENERATOR_NUM_GPUS']} do not fit "
                          f"GPU_WORKERS_MAX*GPUS_PER_WORKER={capacity} GPUs")
        if num("SERVE_GENERATOR_REPLICAS") < 1 or num("SERVE_GENERATOR_REPLICAS") > num("SERVE_GENERATOR_MAX_REPLICAS"):
            errors.append("need 1 <= SERVE_GENERATOR_REPLICAS <= SERVE_GENERATOR_MAX_REPLICAS")
    if "rayjob-train" in templates and num("TRAIN_NUM_WORKERS") > capacity:
        errors.append(
            f"TRAIN_NUM_WORKERS={values['TRAIN_NUM_WORKERS']} > GPU_WORKERS_MAX*GPUS_PER_WORKER={capacity}"
        )

    backbone, mount, pvc = str(values["BACKBONE_URI"]), str(values["WEIGHTS_MOUNT_PATH"]), values["WEIGHTS_PVC"]
    under_mount = backbone.rstrip("/").startswith(mount.rstrip("/") + "/")
    if _is_local(backbone) and not (pvc and under_mount):
        errors.append(
            f"BACKBONE_URI={backbone!r} is a local path: set WEIGHTS_PVC and put it under "
            f"WEIGHTS_MOUNT_PATH={mount!r}, or use an s3:// URI"
        )
    if "weights-pvc" in templates and not (pvc and _is_local(backbone) and under_mount):
        errors.append("weights-pvc needs WEIGHTS_PVC set and BACKBONE_URI under WEIGHTS_MOUNT_PATH")

    names = {"NAME_PREFIX-cluster": (f"{values['NAME_PREFIX']}-cluster", MAX_RAYCLUSTER_NAME)}
    names["BATCH_JOB_NAME"] = (str(values["BATCH_JOB_NAME"]), MAX_RAYJOB_NAME)
    names["TRAIN_JOB_NAME"] = (str(values["TRAIN_JOB_NAME"]), MAX_RAYJOB_NAME)
    names["SERVICE_NAME"] = (str(values["SERVICE_NAME"]), MAX_RAYSERVICE_NAME)
    for label, (name, limit) in names.items():
        if not _DNS1035.match(name) or len(name) > limit:
            errors.append(f"{label}={name!r}: must be a DNS-1035 label of <= {limit} chars")
    if errors:
        raise RenderError("invalid values:\n  - " + "\n  - ".join(errors))


# ----------------------------------------------------------------------------- render


def _render_node(node: Any, lookup, key: str | None = None) -> Any:
    if isinstance(node, dict):
        if RENDER_IF in node:
            cond = node[RENDER_IF]
            if not isinstance(cond, str) or not re.fullmatch(_NAME, cond):
                raise RenderError(f"{RENDER_IF} expects a value NAME, got {cond!r}")
            if not lookup(cond):
                return _DROP
        out = {}
        for k, v in node.items():
            if k == RENDER_IF:
                continue
            r = _render_node(v, lookup, k)
            if r is _DROP or r is None:
                continue
            out[k] = yaml.safe_dump(r, sort_keys=False) if k == SERVE_CONFIG_KEY and isinstance(r, dict) else r
        return out
    if isinstance(node, list):
        return [r for r in (_render_node(v, lookup) for v in node) if r is not _DROP]
    if isinstance(node, str):
        out = _sub_string(node, lookup, quote=(key == "entrypoint"))
        if key == "entrypoint" and isinstance(out, str):
            out = " ".join(out.split()) if "'" not in out and '"' not in out else out.strip()
        return out
    return node


def _load_template(name: str) -> list[dict]:
    if name not in TEMPLATES:
        raise RenderError(f"unknown template {name!r}; choose from {', '.join(TEMPLATES)} or 'all'")
    with open(K8S_DIR / TEMPLATES[name], encoding="utf-8") as fh:
        return [d for d in yaml.safe_load_all(fh) if d is not None]


def render_template(name: str, values: Mapping[str, Any]) -> list[dict]:
    """Render one template file to a list of Kubernetes objects."""
    derived: dict[str, Any] = {}

    def lookup(var: str) -> Any:
        if var in values:
            return values[var]
        if var == "RAYCLUSTER_SPEC":
            if var not in derived:
                derived[var] = render_template("raycluster", values)[0]["spec"]
            return derived[var]
        raise RenderError(f"{TEMPLATES[name]}: unknown placeholder ${{{var}}}")

    return [_render_node(doc, lookup) for doc in _load_template(name)]


def expand(names: Iterable[str]) -> list[str]:
    out: list[str] = []
    for n in names:
        for m in DEFAULT_SET if n == "all" else (n,):
            if m not in TEMPLATES:
                raise RenderError(f"unknown template {m!r}; choose from {', '.join(TEMPLATES)} or 'all'")
            if m not in out:
                out.append(m)
    return out


def render(names: Iterable[str], values: Mapping[str, Any], check: bool = True) -> dict[str, list[dict]]:
    names = expand(names)
    if check:
        check_values(values, names)
    return {n: render_template(n, values) for n in names}


class _NoAliasDumper(yaml.SafeDumper):
    def ignore_aliases(self, data):  # noqa: D401 - yaml API
        return True


def dump(docs: Iterable[dict]) -> str:
    return yaml.dump_all(list(docs), Dumper=_NoAliasDumper, sort_keys=False, width=1 << 16, explicit_start=True)


def write_dir(rendered: Mapping[str, list[dict]], out_dir: Path) -> list[Path]:
    """One file per template plus a kustomization.yaml listing them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, docs in rendered.items():
        path = out_dir / TEMPLATES[name]
        path.write_text(_HEADER.format(name=name) + dump(docs), encoding="utf-8")
        written.append(path)
    kust = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [p.name for p in written],
    }
    (out_dir / "kustomization.yaml").write_text(_HEADER.format(name="all") + yaml.safe_dump(kust, sort_keys=False))
    return written


_HEADER = "# Rendered by infra/render.py ({name}) from infra/k8s/ -- edit values.yaml, not this file.\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Render infra/k8s/*.yaml with infra/k8s/values.yaml (see infra/README.md).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="templates: " + ", ".join(TEMPLATES) + ", all (= " + " ".join(DEFAULT_SET) + ")",
    )
    ap.add_argument("templates", nargs="*", metavar="TEMPLATE")
    ap.add_argument("-f", "--values", action="append", default=[], metavar="FILE",
                    help="values file merged over infra/k8s/values.yaml (repeatable)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override one value (repeatable; VALUE parsed as YAML)")
    ap.add_argument("-o", "--out", type=Path, help="write one file per template + kustomization.yaml here")
    ap.add_argument("--print-values", action="store_true", help="print the resolved values and exit")
    args = ap.parse_args(argv)
    try:
        values = load_values(args.values, args.set)
        if args.print_values:
            sys.stdout.write(yaml.safe_dump(values, sort_keys=False, width=1 << 16))
            return 0
        if not args.templates:
            ap.error("name at least one TEMPLATE (or 'all')")
        rendered = render(args.templates, values)
    except RenderError as exc:
        print(f"render.py: error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        for p in write_dir(rendered, args.out):
            print(p, file=sys.stderr)
    else:
        sys.stdout.write(dump(d for docs in rendered.values() for d in docs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
