"""The private torch names the package uses: all listed in `megatron_mellama.torch_private`, all present
in the installed torch, and read with the fallbacks torch 2.10..2.13 need."""

import types

import pytest
import torch
from torch.distributed.fsdp import fully_shard

from megatron_mellama import torch_private
from megatron_mellama.parallel import data


def test_every_private_name_in_the_registry_resolves_on_the_installed_torch():
    assert torch_private.unresolved() == []
    tracker, total_key, kinds = torch_private.mem_tracker_parts()
    torch_private.require_members(tracker(), torch_private.MEM_TRACKER_STATE, "MemTracker")
    assert total_key and kinds.PARAM is not None


def test_a_missing_private_name_is_one_line_naming_it_and_the_torch_version(monkeypatch):
    monkeypatch.setitem(torch_private.PRIVATE, "FakeThing._gone",
                        torch_private.Private("torch.nn", ("Module._no_such_attribute",)))
    torch_private.resolve.cache_clear()
    try:
        with pytest.raises(torch_private.PrivateTorchError) as error:
            torch_private.resolve("FakeThing._gone")
    finally:
        torch_private.resolve.cache_clear()
    message = str(error.value)
    assert "\n" not in message and "FakeThing._gone" in message and torch.__version__ in message


class _Group:
    """An FSDP parameter group as the weight pass uses it."""

    def __init__(self):
        self.post_backwards = 0
        self.fsdp_params = []

    def post_backward(self):
        self.post_backwards += 1


def _pre_2_13_states(n: int):
    """A root FSDP state and its units in torch 2.11's shape: one `_fsdp_param_group` (or None)
    per unit, no `_fsdp_param_groups` list."""
    units = [types.SimpleNamespace(_fsdp_param_group=_Group()) for _ in range(n)]
    units.append(types.SimpleNamespace(_fsdp_param_group=None))  # a unit without parameters
    finished = []
    root = types.SimpleNamespace(_state_ctx=types.SimpleNamespace(all_states=units),
                                 _root_post_backward_final_callback=lambda: finished.append(True),
                                 _fsdp_param_group=units[0]._fsdp_param_group)
    return root, units, finished


def test_the_weight_pass_reduces_with_a_pre_2_13_fsdp_state(monkeypatch):
    """zero-bubble's split weight-gradient pass (`reduce_gradients_now`) on FSDP states shaped as
    torch 2.11/2.12 make them: each unit's group is reduce-scattered once, the root finalised once."""
    root, units, finished = _pre_2_13_states(3)
    module = types.SimpleNamespace(_get_fsdp_state=lambda: root)
    monkeypatch.setattr(fully_shard, "state", lambda m: root, raising=False)
    data.reduce_gradients_now(module)
    assert [u._fsdp_param_group.post_backwards for u in units[:-1]] == [1, 1, 1]
    assert finished == [True]


def test_fsdp_param_groups_reads_both_shapes():
    group = _Group()
    assert torch_private.fsdp_param_groups(types.SimpleNamespace(_fsdp_param_groups=[group])) == [group]
    assert torch_private.fsdp_param_groups(types.SimpleNamespace(_fsdp_param_group=group)) == [group]
    assert torch_private.fsdp_param_groups(types.SimpleNamespace(_fsdp_param_group=None)) == []
    with pytest.raises(torch_private.PrivateTorchError, match="_fsdp_param_group"):
        torch_private.fsdp_param_groups(types.SimpleNamespace())


def test_foreach_mul_scales_in_place_with_or_without_the_fused_op(monkeypatch):
    tensors = [torch.ones(3), torch.full((2,), 2.0)]
    torch_private.foreach_mul_(tensors, 0.5)
    assert [t.tolist() for t in tensors] == [[0.5] * 3, [1.0, 1.0]]
    monkeypatch.setattr(torch_private, "optional", lambda name: None)
    torch_private.foreach_mul_(tensors, torch.tensor(4.0))
    assert [t.tolist() for t in tensors] == [[2.0] * 3, [4.0, 4.0]]


def _private_torch_names(source: str) -> list[tuple[int, str]]:
    """(line, name) of each private torch module or attribute that code (not text) names."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch"):
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("torch")]
        elif isinstance(node, ast.Attribute):
            chain, base = [node.attr], node.value
            while isinstance(base, ast.Attribute):
                chain.append(base.attr)
                base = base.value
            rooted = isinstance(base, ast.Name) and base.id == "torch"
            # FSDP2's state is reached through a module, not through `torch`
            names = [".".join(reversed(chain))] if rooted or node.attr.startswith(("_fsdp", "_get_fsdp")) else []
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
              and len(node.args) >= 2 and isinstance(node.args[0], ast.Name) and node.args[0].id == "torch"
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
            names = [f"torch.{node.args[1].value}"]
        else:
            continue
        found += [(node.lineno, n) for n in names if any(part.startswith("_") and not part.startswith("__")
                                                         for part in n.split("."))]
    return found


def test_no_module_but_the_registry_names_a_private_torch_attribute():
    """The registry is the one place to look when a torch release moves an internal: a private
    module or attribute of torch named anywhere else in the package escapes its fallbacks."""
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "megatron_mellama"
    offenders = [f"{path.relative_to(package)}:{line}: {name}" for path in sorted(package.rglob("*.py"))
                 if path.name != "torch_private.py" for line, name in _private_torch_names(path.read_text())]
    assert not offenders, "\n".join(offenders)


def test_the_scan_finds_each_way_of_naming_a_private_attribute():
    source = ("import torch.distributed._functional_collectives as f\n"
              "from torch.utils._pytree import tree_flatten\n"
              "x = torch._foreach_norm\n"
              "y = state._fsdp_param_groups\n"
              "z = torch.nn.functional.silu  # torch._nothing in a comment\n")
    assert [line for line, _ in _private_torch_names(source)] == [1, 2, 2, 3, 4]


def test_the_scan_finds_a_private_attribute_read_by_getattr():
    assert _private_torch_names('f = getattr(torch, "_foreach_norm", None)\n') == [(1, "torch._foreach_norm")]
