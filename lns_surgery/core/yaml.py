"""YAML as this project reads it: PyYAML's safe loader, except that a mapping may not repeat a key.

PyYAML keeps the last of repeated keys without a word, so a recipe that sets ``learning_rate`` twice
trains with whichever came last; here it is an error that names the key and both lines.
Importing this module imports PyYAML: import it where YAML is read, not at start-up.
"""

from __future__ import annotations

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with a repeated key (a ``yaml.YAMLError``)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # '<<' merges are PyYAML's own business
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: PyYAML's own check reports it
                    continue
                if first is not None:
                    # The problem first, with both lines: callers quote an error's first line.
                    raise ConstructorError(
                        None, None, f"the key {key!r} appears twice, on lines {first.line + 1} and "
                        f"{key_node.start_mark.line + 1}; each key may appear once", key_node.start_mark)
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def safe_load(stream):
    """``yaml.safe_load`` that refuses repeated keys; raises ``yaml.YAMLError`` like it."""
    return yaml.load(stream, Loader=UniqueKeyLoader)  # noqa: S506  (a SafeLoader subclass)
