"""The table contract is the only way in: no module outside a table's own file touches its
private attributes (the sharding layer, policies, optimizers and checkpoints all go through
``HashTable`` / ``TableStore``'s public verbs)."""

import ast
import pathlib

import recis

ROOT = pathlib.Path(recis.__file__).parent
# class -> the file that owns it; its private names may be used only there
OWNED = {
    "HashTable": "nn/modules/hashtable.py",
    "TableStore": "_core/store.py",
    "IdMap": "_core/id_map.py",
    "SlotStore": "_core/slots.py",
}
# private names that the owners share with unrelated classes, so a use elsewhere says nothing
COMMON = {"_name", "_device", "_params"}


def _private_names(path: pathlib.Path, cls: str) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for sub in ast.walk(node):
                if isinstance(sub, ast.FunctionDef) and sub.name.startswith("_") \
                        and not sub.name.startswith("__"):
                    names.add(sub.name)
                if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) \
                        and sub.value.id == "self" and sub.attr.startswith("_") \
                        and not sub.attr.startswith("__"):
                    names.add(sub.attr)
    return names - COMMON


def test_no_module_outside_a_table_touches_its_private_attributes():
    owned = {cls: _private_names(ROOT / path, cls) for cls, path in OWNED.items()}
    assert owned["TableStore"] and owned["HashTable"]  # the scan finds something to guard
    offenders = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        guarded = set().union(*(names for cls, names in owned.items() if OWNED[cls] != rel))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in guarded and not (
                    isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                offenders.append(f"{rel}:{node.lineno}: .{node.attr}")
    assert not offenders, "private table attributes used outside their class:\n" + "\n".join(
        offenders)
