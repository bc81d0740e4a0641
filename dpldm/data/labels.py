"""The one rule that turns class-folder names into labels, shared by `dpldm data import` (image
folders) and `dpldm evaluate` (PNG folders), so both read the same folder the same way:

    every name an integer ("0", "7", "10", "007")  ->  label = int(name); sorted numerically;
                                                      num_classes = largest label + 1
    no name an integer ("cat", "dog")              ->  sorted names -> labels 0..K-1
    a mix ("0", "1", "cat")                        ->  refused (LabelRuleError)

Integer means ASCII digits only (`^[0-9]+$`): "-1", "1.5", "²" are names, not integers. Two
integer names with the same value ("7" and "07") are refused. The name -> label map is returned
so it can be saved (the import manifest records it under `label_rule` / `class_to_label`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from dpldm.data.errors import SourceError

_INTEGER = re.compile(r"^[0-9]+$")
RULE_INTEGER = "integer"  # label = int(folder name)
RULE_SORTED = "sorted-names"  # sorted folder names -> 0..K-1

RULE_TEXT = {
    RULE_INTEGER: "integer folder names: label = int(name), sorted numerically",
    RULE_SORTED: "folder names sorted as text -> labels 0..K-1",
}


class LabelRuleError(SourceError):
    """Class-folder names that the label rule cannot map (a mix of integers and names, duplicates)."""


@dataclass(frozen=True)
class ClassLabels:
    rule: str                        # RULE_INTEGER | RULE_SORTED
    class_to_label: dict[str, int]   # folder name -> label, in label order
    num_classes: int                 # labels lie in [0, num_classes)

    @property
    def folders(self) -> list[str]:
        """The folder names in label order."""
        return list(self.class_to_label)

    def class_names(self) -> list[str]:
        """One name per label 0..num_classes-1 (integer rule: str(label), also for labels without a folder)."""
        if self.rule == RULE_INTEGER:
            return [str(i) for i in range(self.num_classes)]
        return self.folders

    def describe(self) -> str:
        return RULE_TEXT[self.rule]

    def to_json(self) -> dict:
        return {"label_rule": self.rule, "label_rule_text": self.describe(), "class_to_label": dict(self.class_to_label)}


def class_labels(names: list[str] | tuple[str, ...], where: str = "folder") -> ClassLabels:
    """Labels for class folders `names` by the shared rule (see the module doc); `where` names the
    folder in errors."""
    names = list(names)
    if not names:
        raise LabelRuleError(f"{where}: no class subfolders")
    ints = [n for n in names if _INTEGER.fullmatch(n)]
    if ints and len(ints) != len(names):
        others = [n for n in names if not _INTEGER.fullmatch(n)]
        raise LabelRuleError(
            f"{where}: class folders mix integer names ({ints[0]!r}) and other names ({others[0]!r}); "
            "name them all by integer label (0, 1, ...) or all by class name")
    if ints:
        seen: dict[int, str] = {}
        for n in names:
            if int(n) in seen:
                raise LabelRuleError(f"{where}: class folders {seen[int(n)]!r} and {n!r} are the same label {int(n)}")
            seen[int(n)] = n
        order = sorted(names, key=int)
        return ClassLabels(RULE_INTEGER, {n: int(n) for n in order}, max(seen) + 1)
    order = sorted(names)
    return ClassLabels(RULE_SORTED, {n: i for i, n in enumerate(order)}, len(order))
