"""Safe YAML loading that remembers where every key and value came from.

PyYAML's SafeLoader already refuses `!!python/...` tags when it constructs objects, but it silently
lets a later duplicate key win and it forgets positions. We compose the node tree ourselves, turn it
into plain Python values and keep a map from field path to (line, column), so every error can name
`file:line:col`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from recipec.errors import EXIT_INVALID, FieldPath, Problem, RecipecError

Path_ = tuple[str | int, ...]

_PLAIN_TAGS = {
    "tag:yaml.org,2002:str", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool", "tag:yaml.org,2002:null",
}
_MAX_NODES = 100_000  # an alias bomb ("billion laughs") expands past this long before it hurts
_MAX_DEPTH = 64


class YamlProblem(RecipecError):
    """A YAML syntax or safety problem at a position; the loader reports it as a recipe problem."""

    exit_code = EXIT_INVALID

    def __init__(self, message: str, line: int, col: int, path: Path_ = ()):
        super().__init__(message)
        self.message, self.line, self.col, self.path = message, line, col, path


@dataclass
class Located:
    value: Any
    positions: dict[Path_, tuple[int, int]] = field(default_factory=dict)  # path -> 1-based (line, col) of the value
    key_positions: dict[Path_, tuple[int, int]] = field(default_factory=dict)  # path -> position of its key


def load(text: str) -> Located:
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # its constructor already scans for unprintable characters
        node = loader.get_single_node()
    except yaml.reader.ReaderError as exc:
        line, col = _line_col(text, exc.position)
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        raise YamlProblem(f"malformed YAML: unprintable character U+{code:04X} (control characters are not "
                          f"allowed in YAML)", line, col) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise YamlProblem(f"malformed YAML: {exc.problem or exc}", line, col) from None
    except yaml.YAMLError as exc:
        raise YamlProblem(f"malformed YAML: {exc}", 1, 1) from None
    except RecursionError:
        raise YamlProblem(f"YAML nested too deeply (more than {_MAX_DEPTH} levels)", 1, 1) from None
    finally:
        if loader is not None:
            loader.dispose()
    if node is None:
        raise YamlProblem("the file is empty: a recipe is a YAML mapping", 1, 1)
    out = Located(None)
    budget = [_MAX_NODES]
    out.value = _convert(loader, node, (), out, budget)
    return out


def _line_col(text: str, index: int) -> tuple[int, int]:
    before = text[:index]
    return before.count("\n") + 1, index - (before.rfind("\n") + 1) + 1


def _pos(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _convert(loader: yaml.SafeLoader, node: yaml.Node, path: Path_, out: Located, budget: list[int]) -> Any:
    budget[0] -= 1
    if budget[0] < 0:
        raise YamlProblem(f"YAML document too large (more than {_MAX_NODES} nodes after expanding aliases)", *_pos(node), path)
    if len(path) > _MAX_DEPTH:
        raise YamlProblem(f"YAML nested too deeply (more than {_MAX_DEPTH} levels)", *_pos(node), path)
    out.positions[path] = _pos(node)
    if isinstance(node, yaml.MappingNode):
        return _mapping(loader, node, path, out, budget)
    if isinstance(node, yaml.SequenceNode):
        _check_tag(node, "tag:yaml.org,2002:seq", path)
        return [_convert(loader, item, path + (i,), out, budget) for i, item in enumerate(node.value)]
    if node.tag not in _PLAIN_TAGS:
        raise YamlProblem(f"unsupported YAML tag {node.tag!r}: recipes hold only plain data", *_pos(node), path)
    try:
        return loader.construct_object(node, deep=True)
    except (yaml.YAMLError, ValueError, OverflowError) as exc:
        raise YamlProblem(f"bad scalar: {exc}", *_pos(node), path) from None


def _mapping(loader, node, path, out, budget) -> dict:
    _check_tag(node, "tag:yaml.org,2002:map", path)
    result: dict = {}
    for key_node, value_node in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            raise YamlProblem("YAML merge keys ('<<') are not supported in recipes", *_pos(key_node), path)
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag not in _PLAIN_TAGS:
            raise YamlProblem("mapping keys must be plain strings", *_pos(key_node), path)
        key = loader.construct_object(key_node)
        if not isinstance(key, str):
            key = str(key)
        if key in result:
            raise YamlProblem(f"duplicate key {key!r}", *_pos(key_node), path + (key,))
        out.key_positions[path + (key,)] = _pos(key_node)
        result[key] = _convert(loader, value_node, path + (key,), out, budget)
    return result


def _check_tag(node: yaml.Node, expected: str, path: Path_) -> None:
    if node.tag != expected:
        raise YamlProblem(f"unsupported YAML tag {node.tag!r}: recipes hold only plain data", *_pos(node), path)


def locate(located: Located, path: FieldPath, message: str, at_key: bool = False) -> Problem:
    """The position of `path`, or of its nearest ancestor present in the file (a missing key's parent)."""
    table = located.key_positions if at_key else located.positions
    for cut in range(len(path), -1, -1):
        prefix = path[:cut]
        if prefix in table:
            return Problem(path, message, *table[prefix])
        if prefix in located.positions:
            return Problem(path, message, *located.positions[prefix])
    return Problem(path, message)
