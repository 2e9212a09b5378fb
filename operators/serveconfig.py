"""Pure edits of a RayService `spec.serveConfigV2` YAML string that leave every other byte alone.

The config has the production layout (the chart writes it): a front application (`spec.application`,
``amalia_serve.app:build_app``) whose `AmaliaIngress` deployment holds the traffic weights in its
`user_config`, and one application per variant, named after it, built by
``amalia_serve.app:build_variant_app``. Serve redeploys every deployment of an application whose
`args` change, so a canary is a new application and nothing that runs restarts.

A serveConfigV2 is written by people and by Helm; re-dumping the whole document would re-quote,
re-indent and re-order parts the operator has no business touching (and show up as a diff in GitOps
tools). So each edit locates the one YAML node it changes (PyYAML's composer gives exact character
offsets) and splices new text into that span only: replace a node, add a key to a mapping, append or
drop one sequence item. Text outside the span is never rewritten.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from amalia_operator.constants import INGRESS_DEPLOYMENT_NAME, VARIANT_IMPORT_PATH
from amalia_operator.models import CanaryVariant
from amalia_operator.rollout import ServeEdit, split_weights

_WIDTH = 1 << 16  # never fold long lines (model paths, runtime_env URLs)


class ServeConfigError(ValueError):
    """The serveConfigV2 does not have the shape the operator needs to edit."""


# The ingress user_config key of shadow traffic: `{variant, percent, max_in_flight}`; absent or
# null is off (the serving side's contract).
SHADOW_KEY = "shadow"


@dataclass(frozen=True)
class AppView:
    variants: tuple[str, ...]
    weights: dict[str, int]
    shadow: dict[str, Any] | None = None


def observe(text: str, app: str) -> AppView:
    """The variant applications of the config and the live weights of front application `app`."""
    doc = yaml.safe_load(text) or {}
    front = _app_data(doc, app)
    if (front.get("args") or {}).get("variants"):
        raise ServeConfigError(
            f"application {app!r} lists args.variants (the single-application layout); the "
            "operator needs one application per variant (see the chart's serveConfigV2)"
        )
    variants = tuple(a["name"] for a in _variant_apps(doc))
    for dep in front.get("deployments") or []:
        if dep.get("name") == INGRESS_DEPLOYMENT_NAME:
            user_config = dep.get("user_config") or {}
            weights, shadow = user_config.get("weights"), user_config.get(SHADOW_KEY)
            if weights is not None:
                return AppView(variants, dict(weights), shadow)
    routing = (front.get("args") or {}).get("routing") or {}
    return AppView(variants, dict(routing.get("weights") or {}))


def apply_edit(text: str, app: str, edit: ServeEdit, canary: CanaryVariant) -> str:
    """Applies one idempotent ServeEdit; returns `text` unchanged when nothing needs changing.

    The weights are computed here from the live split (`split_weights`), so every variant the
    rollout does not own keeps the weight this text gives it. Order keeps the ingress from routing
    to a missing application: a canary's application comes with weight 0 (the ingress accepts
    weight-0 names not deployed yet), and a removed variant's application goes only once a
    previous edit has taken it out of the weights, so removal takes two calls (the state machine
    repeats the edit until the variant is gone).
    """
    view = observe(text, app)
    for name in edit.remove:
        if name not in view.weights and name in view.variants:
            text = remove_variant_app(text, name)
    if edit.add_canary and canary.name not in view.variants:
        text = add_variant_app(text, canary_app(text, canary, edit.stable))
    weights = split_weights(view.weights, edit)
    text = set_weights(text, app, weights)
    for name in edit.remove:
        text = _drop_from_routing_weights(text, app, name, weights)
    shadow = edit.shadow
    if shadow is not None:
        wanted = {"variant": edit.canary, "percent": shadow.percent,
                  "max_in_flight": shadow.max_in_flight}  # fmt: skip
        return set_shadow(text, app, wanted)
    if (view.shadow or {}).get("variant") in edit.owned:
        return set_shadow(text, app, None)
    return text


def canary_app(text: str, canary: CanaryVariant, stable: str) -> dict[str, Any]:
    """The canary's application: the stable's args (engine, deployment) with the canary's
    overrides, and the stable's runtime_env so both run in the same environment.
    """
    base_app = next(
        (a for a in _variant_apps(yaml.safe_load(text) or {}) if a["name"] == stable), None
    )
    if base_app is None:
        raise ServeConfigError(f"stable variant {stable!r} has no application in serveConfigV2")
    base = base_app.get("args") or {}
    args: dict[str, Any] = {"name": canary.name, "model_path": canary.model_path}
    for key, override in (("engine", canary.engine), ("deployment", canary.deployment)):
        merged = _deep_merge(copy.deepcopy(base.get(key) or {}), override or {})
        if merged or key in base:
            args[key] = merged
    entry: dict[str, Any] = {
        "name": canary.name,
        "route_prefix": None,
        "import_path": VARIANT_IMPORT_PATH,
    }
    if "runtime_env" in base_app:
        entry["runtime_env"] = copy.deepcopy(base_app["runtime_env"])
    entry["args"] = args
    return entry


def add_variant_app(text: str, entry: dict[str, Any]) -> str:
    return _append_item(text, _apps_node(yaml.compose(text)), entry)


def remove_variant_app(text: str, name: str) -> str:
    """Drops the variant application `name`; never an application of another kind."""
    node = _apps_node(yaml.compose(text))
    for index, item in enumerate(node.value):
        if _is_variant_app(item) and _scalar(_get(item, "name")) == name:
            return _remove_item(text, node, index)
    return text


def set_weights(text: str, app: str, weights: dict[str, int]) -> str:
    """Sets `deployments[name=AmaliaIngress].user_config.weights`, creating what is missing."""
    app_node = _app_node(yaml.compose(text), app)
    deployments = _get(app_node, "deployments")
    ingress_entry = {"name": INGRESS_DEPLOYMENT_NAME, "user_config": {"weights": weights}}
    if deployments is None or not isinstance(deployments, SequenceNode):
        if deployments is not None:
            return _replace(text, deployments, [ingress_entry])
        return _insert_key(text, app_node, "deployments", [ingress_entry])
    entry = next(
        (
            d
            for d in deployments.value
            if isinstance(d, MappingNode) and _scalar(_get(d, "name")) == INGRESS_DEPLOYMENT_NAME
        ),
        None,
    )
    if entry is None:
        return _append_item(text, deployments, ingress_entry)
    user_config = _get(entry, "user_config")
    if not isinstance(user_config, MappingNode):
        if user_config is not None:
            return _replace(text, user_config, {"weights": weights})
        return _insert_key(text, entry, "user_config", {"weights": weights})
    current = _get(user_config, "weights")
    if current is None:
        return _insert_key(text, user_config, "weights", weights)
    if _value(current) == weights:
        return text
    return _replace(text, current, weights)


def set_shadow(text: str, app: str, shadow: dict[str, Any] | None) -> str:
    """Sets `deployments[name=AmaliaIngress].user_config.shadow`, or removes the key with None
    (rather than writing null: the config then reads as it did before any shadow). Expects the
    ingress entry and its user_config, which set_weights makes."""
    user_config = _ingress_user_config(yaml.compose(text), app)
    if user_config is None:
        if shadow is None:
            return text
        raise ServeConfigError(f"application {app!r} has no {INGRESS_DEPLOYMENT_NAME} user_config")
    current = _get(user_config, SHADOW_KEY)
    if shadow is None:
        return text if current is None else _remove_key(text, user_config, SHADOW_KEY)
    if current is None:
        return _insert_key(text, user_config, SHADOW_KEY, shadow)
    if _value(current) == shadow:
        return text
    return _replace(text, current, shadow)


def _ingress_user_config(root: Node | None, app: str) -> MappingNode | None:
    deployments = _get(_app_node(root, app), "deployments")
    if not isinstance(deployments, SequenceNode):
        return None
    for entry in deployments.value:
        if (
            isinstance(entry, MappingNode)
            and _scalar(_get(entry, "name")) == INGRESS_DEPLOYMENT_NAME
        ):
            user_config = _get(entry, "user_config")
            return user_config if isinstance(user_config, MappingNode) else None
    return None


def _drop_from_routing_weights(text: str, app: str, removed: str, weights: dict[str, int]) -> str:
    """`args.routing.weights` (the ingress's start-up weights) must not name a removed variant."""
    args = _get(_app_node(yaml.compose(text), app), "args")
    routing = _get(args, "routing") if isinstance(args, MappingNode) else None
    node = _get(routing, "weights") if isinstance(routing, MappingNode) else None
    if node is None or removed not in (_value(node) or {}):
        return text
    return _replace(text, node, weights)


# --- locating nodes ---------------------------------------------------------------------------
def _app_data(doc: Any, app: str) -> dict[str, Any]:
    for application in (doc.get("applications") or []) if isinstance(doc, dict) else []:
        if isinstance(application, dict) and application.get("name") == app:
            return application
    raise ServeConfigError(f"serveConfigV2 has no application named {app!r}")


def _variant_apps(doc: Any) -> list[dict[str, Any]]:
    apps = (doc.get("applications") or []) if isinstance(doc, dict) else []
    return [a for a in apps if isinstance(a, dict) and a.get("import_path") == VARIANT_IMPORT_PATH]


def _is_variant_app(node: Node) -> bool:
    return _scalar(_get(node, "import_path")) == VARIANT_IMPORT_PATH


def _apps_node(root: Node | None) -> SequenceNode:
    apps = _get(root, "applications") if isinstance(root, MappingNode) else None
    if not isinstance(apps, SequenceNode):
        raise ServeConfigError("serveConfigV2 has no applications list")
    return apps


def _app_node(root: Node | None, app: str) -> MappingNode:
    for node in _apps_node(root).value:
        if isinstance(node, MappingNode) and _scalar(_get(node, "name")) == app:
            return node
    raise ServeConfigError(f"serveConfigV2 has no application named {app!r}")


def _get(mapping: Node | None, key: str) -> Node | None:
    if not isinstance(mapping, MappingNode):
        return None
    return next((v for k, v in mapping.value if _scalar(k) == key), None)


def _value(node: Node) -> Any:
    return yaml.SafeLoader("").construct_document(node)


def _scalar(node: Node | None) -> str | None:
    return node.value if isinstance(node, ScalarNode) else None


# --- spans and splicing -----------------------------------------------------------------------
def _start(node: Node) -> int:
    return int(node.start_mark.index)


def _end(node: Node) -> int:
    """End of the node's own text: block collections end at their last descendant, not at the next
    token (PyYAML's block end mark swallows trailing blank lines and comments).
    """
    if isinstance(node, (MappingNode, SequenceNode)) and not node.flow_style and node.value:
        last = node.value[-1]
        return _end(last[1] if isinstance(last, tuple) else last)
    end = int(node.end_mark.index)
    text = node.end_mark.buffer
    while end > _start(node) and text is not None and text[end - 1] in " \t\r\n":
        end -= 1
    return end


def _line_end(text: str, pos: int) -> int:
    newline = text.find("\n", pos)
    return len(text) if newline < 0 else newline


def _is_flow(node: Node) -> bool:
    return isinstance(node, (MappingNode, SequenceNode)) and bool(node.flow_style)


def _render(value: Any, column: int, flow: bool) -> str:
    """YAML for `value` placed at `column`: the first line goes in place, the rest are indented."""
    if flow or not isinstance(value, (dict, list)) or not value:
        flat = str(
            yaml.safe_dump(
                value, default_flow_style=True, width=_WIDTH, sort_keys=False, allow_unicode=True
            )
        )
        return flat.removesuffix("\n...\n").strip()
    dumped = str(
        yaml.safe_dump(
            value, default_flow_style=False, width=_WIDTH, sort_keys=False, allow_unicode=True
        )
    ).rstrip("\n")
    return ("\n" + " " * column).join(dumped.split("\n"))


def _replace(text: str, node: Node, value: Any) -> str:
    start, end = _start(node), _end(node)
    flow = _is_flow(node) or isinstance(node, ScalarNode)
    return text[:start] + _render(value, node.start_mark.column, flow) + text[end:]


def _insert_key(text: str, mapping: MappingNode, key: str, value: Any) -> str:
    if _is_flow(mapping):
        data = _value(mapping)
        return _replace(text, mapping, {**data, key: value})
    column = int(mapping.start_mark.column)
    pos = _line_end(text, _end(mapping))
    return text[:pos] + "\n" + " " * column + _render({key: value}, column, flow=False) + text[pos:]


def _append_item(text: str, seq: SequenceNode, value: Any) -> str:
    if _is_flow(seq) or not seq.value:
        data = _value(seq) or []
        return _replace(text, seq, [*data, value])
    column = int(seq.start_mark.column)
    pos = _line_end(text, _end(seq))
    item = _render(value, column + 2, flow=False)
    return text[:pos] + "\n" + " " * column + "- " + item + text[pos:]


def _remove_key(text: str, mapping: MappingNode, key: str) -> str:
    """Drops `key` from `mapping`: its lines in a block mapping, else the mapping re-rendered."""
    pair = next(p for p in mapping.value if _scalar(p[0]) == key)
    line_start = text.rfind("\n", 0, _start(pair[0])) + 1
    if _is_flow(mapping) or len(mapping.value) == 1 or text[line_start : _start(pair[0])].strip():
        data = _value(mapping)
        del data[key]
        return _replace(text, mapping, data)
    line_end = _line_end(text, _end(pair[1]))
    return text[:line_start] + text[min(line_end + 1, len(text)) :]


def _remove_item(text: str, seq: SequenceNode, index: int) -> str:
    data = _value(seq)
    item = seq.value[index]
    dash = text.rfind("-", 0, _start(item))
    line_start = text.rfind("\n", 0, dash) + 1
    if _is_flow(seq) or len(seq.value) == 1 or text[line_start:dash].strip():
        return _replace(text, seq, data[:index] + data[index + 1 :])
    line_end = _line_end(text, _end(item))
    return text[:line_start] + text[min(line_end + 1, len(text)) :]


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = _deep_merge(base[key], value)
        else:
            base[key] = value
    return base
