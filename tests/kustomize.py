"""Test helper (not a test module): render a kustomization as ``kubectl kustomize`` does, for
the subset of kustomize that ``deploy/kubernetes`` uses, so CI needs no kubectl.

    objects = build(Path("deploy/kubernetes/overlays/cpu"))   # a list of dicts

Supported: ``resources`` (YAML files, several documents each, and folders holding a
kustomization), ``components`` (folders holding a Component: its resources and patches apply
to what the kustomization has), ``patches`` with a ``target`` (kind, name) and JSON 6902
operations (add, replace, remove) given inline (``patch``) or in a file (``path``), and
``images`` (name -> newName, newTag). Anything else in a kustomization is an error rather
than silently ignored, so the renderer never hands the validator less than kustomize would
apply.
"""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

KNOWN_KEYS = {"apiVersion", "kind", "resources", "components", "patches", "images"}
POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


class KustomizeError(ValueError):
    pass


def build(folder: Path, objects: list[dict] | None = None, kind: str = "Kustomization") -> list[dict]:
    """The objects the kustomization in ``folder`` renders to, in resource order. A
    component (``kind`` Component) adds to and patches ``objects``, what its user has so far."""
    folder = Path(folder)
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(spec) - KNOWN_KEYS
    if unknown:
        raise KustomizeError(f"{folder}: kustomization fields this renderer does not know: {sorted(unknown)}")
    if spec.get("kind", "Kustomization") != kind:
        raise KustomizeError(f"{folder}: a {spec.get('kind')} where a {kind} belongs")
    objects = [] if objects is None else objects
    for entry in spec.get("resources", []):
        path = folder / entry
        if path.is_dir():
            objects += build(path)
        else:
            # A deep copy of each document: YAML anchors would otherwise share objects that
            # a patch must change in one place only.
            objects += [copy.deepcopy(doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    for entry in spec.get("components", []):  # after the resources, before this one's own patches
        build(folder / entry, objects, kind="Component")
    for patch in spec.get("patches", []):
        apply_patch(objects, patch, folder)
    for image in spec.get("images", []):
        set_image(objects, image)
    return objects


def apply_patch(objects: list[dict], patch: dict, folder: Path) -> None:
    target = patch.get("target") or {}
    if set(target) - {"kind", "name"} or not target:
        raise KustomizeError(f"patch target must name kind and/or name, got {target}")
    text = patch["patch"] if "patch" in patch else (folder / patch["path"]).read_text()
    ops = yaml.safe_load(text)
    if not isinstance(ops, list):
        raise KustomizeError("only JSON 6902 patches (a list of operations) are supported")
    matched = [o for o in objects if all(
        (o["kind"] if key == "kind" else o["metadata"]["name"]) == value for key, value in target.items())]
    if not matched:
        raise KustomizeError(f"patch target {target} matches no object")
    for obj in matched:
        for op in ops:
            json_patch(obj, op)


def json_patch(doc: dict, op: dict) -> None:
    """One RFC 6902 operation (add, replace, remove) on ``doc``, in place."""
    parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
    if not parts:
        raise KustomizeError("a patch cannot replace the whole object")
    parent = doc
    for part in parts[:-1]:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    last, kind = parts[-1], op["op"]
    if isinstance(parent, list):
        if kind == "add":
            index = len(parent) if last == "-" else int(last)
            if not 0 <= index <= len(parent):
                raise KustomizeError(f"{op['path']}: index out of range")
            parent.insert(index, copy.deepcopy(op["value"]))
            return
        index = int(last)
        if not 0 <= index < len(parent):
            raise KustomizeError(f"{op['path']}: index out of range")
        if kind == "replace":
            parent[index] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del parent[index]
        else:
            raise KustomizeError(f"unsupported patch operation {kind!r}")
        return
    if kind in ("replace", "remove") and last not in parent:
        raise KustomizeError(f"{op['path']}: nothing to {kind}")
    if kind in ("add", "replace"):
        parent[last] = copy.deepcopy(op["value"])
    elif kind == "remove":
        del parent[last]
    else:
        raise KustomizeError(f"unsupported patch operation {kind!r}")


def set_image(objects: list[dict], image: dict) -> None:
    """kustomize ``images``: containers whose image name is ``name`` get newName/newTag."""
    for obj in objects:
        if obj["kind"] not in POD_TEMPLATE_KINDS:
            continue
        pod = obj["spec"]["template"]["spec"]
        for container in pod.get("containers", []) + pod.get("initContainers", []):
            name, sep, tag = container["image"].rpartition(":")
            if not sep or "/" in tag:  # no tag (a colon there belongs to a registry's port)
                name, tag = container["image"], ""
            if name != image["name"]:
                continue
            name = image.get("newName", name)
            tag = image.get("newTag", tag)
            container["image"] = f"{name}:{tag}" if tag else name
