"""Every node of the pack, as ComfyUI loaded it, is presentable: a display name, a description, a category
under "DiT Quant", a tooltip on every input, and named outputs. Violations are listed all at once."""

PACK_CATEGORY = "DiT Quant"


def polish_violations(name: str, cls, display_names: dict) -> list[str]:
    problems = []
    if not getattr(cls, "DISPLAY_NAME", "").strip():
        problems.append("no DISPLAY_NAME")
    elif display_names.get(name) != cls.DISPLAY_NAME:
        problems.append("NODE_DISPLAY_NAME_MAPPINGS disagrees with DISPLAY_NAME")
    if len(getattr(cls, "DESCRIPTION", "").strip()) < 20:
        problems.append("no DESCRIPTION (or under 20 characters)")
    category = getattr(cls, "CATEGORY", "")
    if category != PACK_CATEGORY and not category.startswith(PACK_CATEGORY + "/"):
        problems.append(f"CATEGORY {category!r} is not under {PACK_CATEGORY!r}")
    inputs = cls.INPUT_TYPES()
    for section in ("required", "optional"):
        for input_name, spec in inputs.get(section, {}).items():
            options = spec[1] if len(spec) > 1 else {}
            if not str(options.get("tooltip", "")).strip():
                problems.append(f"{section} input {input_name!r} has no tooltip")
    return_types = tuple(getattr(cls, "RETURN_TYPES", ()))
    if return_types:
        return_names = tuple(getattr(cls, "RETURN_NAMES", ()))
        if len(return_names) != len(return_types) or not all(n.strip() for n in return_names):
            problems.append(f"RETURN_NAMES {return_names} do not name each of RETURN_TYPES {return_types}")
        tooltips = getattr(cls, "OUTPUT_TOOLTIPS", None)
        if tooltips is not None and len(tooltips) != len(return_types):
            problems.append("OUTPUT_TOOLTIPS has a different length than RETURN_TYPES")
    elif not getattr(cls, "OUTPUT_NODE", False):
        problems.append("no outputs and not an OUTPUT_NODE (ComfyUI would never run it)")
    if not callable(getattr(cls, getattr(cls, "FUNCTION", ""), None)):
        problems.append(f"FUNCTION {getattr(cls, 'FUNCTION', None)!r} is not a method")
    return problems


def test_every_pack_node_is_polished(comfy):
    names = comfy.modules["loaded_node_classes"]
    assert len(names) >= 4
    violations = {
        name: polish_violations(
            name, comfy.nodes.NODE_CLASS_MAPPINGS[name], comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS
        )
        for name in names
    }
    report = "\n".join(
        f"{name}: {'; '.join(problems)}" for name, problems in sorted(violations.items()) if problems
    )
    assert not report, f"nodes that are not polished:\n{report}"


def test_categories_group_the_pack(comfy):
    """The pack's nodes share one top-level menu, with a sub-menu per node family."""
    categories = {comfy.nodes.NODE_CLASS_MAPPINGS[n].CATEGORY for n in comfy.modules["loaded_node_classes"]}
    assert "DiT Quant/INT8" in categories
    assert {c.split("/")[0] for c in categories} == {PACK_CATEGORY}


class _UnpolishedNode:
    CATEGORY = "loaders"
    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}, "optional": {"strength": ("FLOAT", {"default": 1.0})}}

    def run(self, model, strength=1.0):
        return (model, "")


def test_the_audit_catches_each_kind_of_violation():
    problems = "; ".join(polish_violations("_UnpolishedNode", _UnpolishedNode, {}))
    for expected in (
        "no DISPLAY_NAME",
        "no DESCRIPTION",
        "CATEGORY 'loaders'",
        "input 'model' has no tooltip",
        "input 'strength' has no tooltip",
        "RETURN_NAMES ('model',)",
    ):
        assert expected in problems
