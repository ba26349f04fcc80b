"""The types training loops keep in checkpoints (issue 16, item 7): standard
library values stored natively, user types only through register_type, and
loading never importing or calling anything a file names."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import enum
import json
import pathlib
import sys
from collections import OrderedDict, defaultdict
from fractions import Fraction

import numpy as np
import pytest
import torch

import torch_dtdr
from torch_dtdr import tree
from torch_dtdr.errors import FormatError, UnregisteredTypeError


class Phase(enum.Enum):
    WARMUP = "warmup"
    TRAIN = "train"


class Perm(enum.Flag):
    R = 1
    W = 2


@dataclasses.dataclass
class Schedule:
    warmup: int
    peak: float
    milestones: list = dataclasses.field(default_factory=list)
    weights: torch.Tensor | None = None
    derived: int = dataclasses.field(init=False, default=0)


@dataclasses.dataclass(frozen=True)
class Frozen:
    name: str


@pytest.fixture(autouse=True)
def _registrations():
    for cls in (Phase, Perm, Schedule, Frozen):
        torch_dtdr.register_type(cls)
    torch_dtdr.register_type(Fraction, lambda f: [f.numerator, f.denominator], lambda p: Fraction(*p))
    yield
    for cls in (Phase, Perm, Schedule, Frozen, Fraction):
        torch_dtdr.unregister_type(cls)


def _roundtrip(obj, tmp_path):
    path = tmp_path / "ckpt.dtdr"
    torch_dtdr.save(obj, path)
    return torch_dtdr.load(path)


def _assert_same(a, b):
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, (dict, argparse.Namespace)):
        da, db = (vars(a), vars(b)) if isinstance(a, argparse.Namespace) else (a, b)
        assert list(da) == list(db)
        for k in da:
            _assert_same(da[k], db[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    elif dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            _assert_same(getattr(a, f.name), getattr(b, f.name))
    else:
        assert a == b


def test_training_loop_types_come_back_with_exact_types(tmp_path):
    utc_plus_2 = datetime.timezone(datetime.timedelta(hours=2), "CEST")
    checkpoint = {
        "hparams": argparse.Namespace(lr=3e-4, layers=[64, 64], out=pathlib.Path("runs/a")),
        "seen": {1, 2, 3},
        "frozen": frozenset({"a", "b"}),
        "counts": defaultdict(int, {"x": 3}),
        "groups": defaultdict(list, {"a": [1]}),
        "by_phase": defaultdict(Phase, {}),
        "no_factory": defaultdict(None, {"k": 1}),
        "ordered": OrderedDict([("b", 1), ("a", 2)]),
        "paths": [pathlib.PurePosixPath("/x/y"), pathlib.PureWindowsPath(r"C:\data\y"), pathlib.Path("rel")],
        "phase": Phase.TRAIN,
        "perm": Perm.R | Perm.W,
        "started": datetime.datetime(2026, 12, 2, 13, 0, 5, 123456),
        "aware": datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc),
        "named_tz": datetime.datetime(2026, 6, 1, 8, tzinfo=utc_plus_2),
        "fold": datetime.datetime(2026, 10, 25, 2, 30, fold=1),
        "day": datetime.date(2026, 2, 28),
        "at": datetime.time(23, 59, 59, 999999),
        "elapsed": datetime.timedelta(days=-1, seconds=5, microseconds=7),
        "schedule": Schedule(10, 0.5, [100, 200], torch.arange(4.0)),
        "frozen_dc": Frozen("x"),
        "ratio": Fraction(3, 7),
        "np": [np.float32(0.5), np.int64(-3), np.bool_(True)],
    }
    checkpoint["schedule"].derived = 7
    out = _roundtrip(checkpoint, tmp_path)
    _assert_same(checkpoint, out)
    assert out["counts"]["missing"] == 0 and out["groups"].default_factory is list
    assert out["by_phase"].default_factory is Phase and out["no_factory"].default_factory is None
    assert out["named_tz"].tzinfo.tzname(None) == "CEST" and out["fold"].fold == 1
    assert out["aware"].tzinfo is datetime.timezone.utc
    assert out["schedule"].derived == 7
    assert out["perm"] is Perm.R | Perm.W


def test_registered_object_tensors_are_stored_as_tensors(tmp_path):
    sched = Schedule(1, 1.0, weights=torch.randn(5))
    torch_dtdr.save({"s": sched}, tmp_path / "a.dtdr")
    names = [t["name"] for t in torch_dtdr.info(tmp_path / "a.dtdr")["tensors"]]
    assert names == ["s.weights"]
    assert torch.equal(torch_dtdr.load(tmp_path / "a.dtdr")["s"].weights, sched.weights)


def test_unregistered_type_is_a_typed_error_or_a_plain_dict(tmp_path):
    torch_dtdr.save({"phase": Phase.WARMUP, "s": Schedule(1, 2.0)}, tmp_path / "a.dtdr")
    torch_dtdr.unregister_type(Phase)
    with pytest.raises(UnregisteredTypeError, match="test_tree_types.Phase"):
        torch_dtdr.load(tmp_path / "a.dtdr")
    with torch_dtdr.unknown_types_as_dicts():
        out = torch_dtdr.load(tmp_path / "a.dtdr")
    assert out["phase"] == {"__dtdr_type__": f"{__name__}.Phase", "value": "WARMUP"}
    assert isinstance(out["s"], Schedule)  # still registered
    with pytest.raises(UnregisteredTypeError):  # the option ends with its block
        torch_dtdr.load(tmp_path / "a.dtdr")
    # verify/info need no registration: they only check the form
    assert torch_dtdr.verify(tmp_path / "a.dtdr").status == "exact"


def test_unregistered_defaultdict_factory(tmp_path):
    torch_dtdr.save({"d": defaultdict(Phase, {"a": Phase.TRAIN})}, tmp_path / "a.dtdr")
    torch_dtdr.unregister_type(Phase)
    with pytest.raises(UnregisteredTypeError):
        torch_dtdr.load(tmp_path / "a.dtdr")
    with torch_dtdr.unknown_types_as_dicts():
        out = torch_dtdr.load(tmp_path / "a.dtdr")
    assert type(out["d"]) is defaultdict and out["d"].default_factory is None
    assert out["d"]["a"]["value"] == "TRAIN"


def _skeleton(root):
    return {"format": tree.FORMAT_NAME, "version": 1, "root": root, "tensors": [], "entries": []}


def test_a_file_naming_a_module_never_imports_or_calls_it():
    name = "dtdr_module_never_to_be_imported.Evil"
    for root in (["object", name, "x"], ["object", "os.system", "echo hacked"],
                 ["defaultdict", ["type", "subprocess.Popen"]]):
        tree.validate(_skeleton(root), 0)  # well-formed: only the loader's registry decides
        with pytest.raises(UnregisteredTypeError):
            tree.unflatten(_skeleton(root), lambda i: None)
    assert "dtdr_module_never_to_be_imported" not in sys.modules


@pytest.mark.parametrize("root", [
    ["object", "bad name!", 1],
    ["object", "a.B"],
    ["object", "a.B", 1, 2],
    ["object", 5, 1],
    ["defaultdict", "lambda"],
    ["defaultdict", ["type"]],
    ["defaultdict", "int", "k"],
    ["defaultdict"],
    ["namespace", 1, 2],
    ["namespace", "__class__", 1],
    ["namespace", "__dict__", 1],
    ["set", 1, 1],
    ["set", ["list"]],
    ["frozenset", ["dict"]],
    ["path", "Path", "x"],
    ["path", "PosixPath", 1],
    ["date", 2026, 13, 1],
    ["date", 2026, 1],
    ["datetime", 2026, 1, 1, 0, 0, 0, 0, 2, None],
    ["datetime", 2026, 1, 1, 0, 0, 0, 0, 0, ["tz", 86400, 0, None]],
    ["datetime", 2026, 1, 1, 0, 0, 0, 0, 0, "UTC"],
    ["time", 25, 0, 0, 0, 0, None],
    ["timedelta", 1, 86400, 0],
    ["timedelta", 10**12, 0, 0],
    ["timedelta", 1.5, 0, 0],
])
def test_malformed_new_nodes_are_format_errors(root):
    with pytest.raises(FormatError):
        tree.validate(_skeleton(root), 0)
        tree.unflatten(_skeleton(root), lambda i: None)


def test_a_failing_from_plain_is_a_format_error_naming_the_type():
    root = ["object", f"{__name__}.Schedule", ["dict", "warmup", 1]]
    with pytest.raises(FormatError, match="Schedule"):
        tree.unflatten(_skeleton(root), lambda i: None)
    with pytest.raises(FormatError, match="no member"):
        tree.unflatten(_skeleton(["object", f"{__name__}.Phase", "__class__"]), lambda i: None)


def test_register_type_rejects_what_it_cannot_do():
    class Plain:
        pass

    with pytest.raises(TypeError, match="to_plain"):
        torch_dtdr.register_type(Plain)
    with pytest.raises(ValueError, match="builtin"):
        torch_dtdr.register_type(dict, dict, dict)
    with pytest.raises(ValueError, match="already registered"):
        torch_dtdr.register_type(Plain, vars, Plain, name=f"{__name__}.Phase")
    with pytest.raises(TypeError, match="Plain"):
        tree.flatten({"x": Plain()})


def test_unsupported_tzinfo_and_lambda_factory_name_the_path():
    class Zone(datetime.tzinfo):
        def utcoffset(self, dt):
            return datetime.timedelta(hours=1)

    with pytest.raises(TypeError, match=r"tzinfo Zone at obj\['t'\]"):
        tree.flatten({"t": datetime.datetime(2026, 1, 1, tzinfo=Zone())})
    with pytest.raises(TypeError, match=r"default_factory .* at obj\['d'\]"):
        tree.flatten({"d": defaultdict(lambda: 1)})


def test_self_reference_through_a_registered_type_is_caught():
    @dataclasses.dataclass
    class Node:
        child: object = None

    torch_dtdr.register_type(Node)
    try:
        n = Node()
        n.child = n
        with pytest.raises(ValueError, match="self-referencing"):
            tree.flatten(n)
    finally:
        torch_dtdr.unregister_type(Node)


def test_namespace_and_set_skeleton_layout_is_the_documented_one():
    skel, _ = tree.flatten({"ns": argparse.Namespace(a=1), "s": {2}, "d": defaultdict(int, {"k": 1}),
                            "p": pathlib.PurePosixPath("/a"), "e": Phase.TRAIN})
    assert json.loads(tree.skeleton_to_json(skel))["root"] == [
        "dict", "ns", ["namespace", "a", 1], "s", ["set", 2], "d", ["defaultdict", "int", "k", 1],
        "p", ["path", "PurePosixPath", "/a"], "e", ["object", f"{__name__}.Phase", "TRAIN"]]


def test_golden_tree_kinds_file_decodes_unchanged():
    from tests.data import make_golden_tree_kinds as golden

    torch_dtdr.register_type(golden.Phase, name=golden.PHASE_NAME)
    try:
        path = pathlib.Path(__file__).parent / "data" / "golden_v1_tree_kinds.dtdr"
        _assert_same(golden.golden_object(), torch_dtdr.load(path, errors="strict"))
    finally:
        torch_dtdr.unregister_type(golden.Phase)


def test_random_mutations_of_the_new_nodes_only_raise_format_errors():
    import copy
    import random

    obj = {"ns": argparse.Namespace(a=1, b=[2]), "s": {1, 2, "x"}, "fs": frozenset({3}),
           "dd": defaultdict(list, {"k": [1]}), "p": pathlib.PurePosixPath("/a/b"),
           "dt": datetime.datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=datetime.timezone(datetime.timedelta(hours=3), "X")),
           "d": datetime.date(2020, 1, 1), "t": datetime.time(1, 2), "td": datetime.timedelta(1, 2, 3),
           "e": Phase.TRAIN, "dc": Schedule(1, 2.0, [3])}
    skel, entries = tree.flatten(obj)
    base = json.loads(tree.skeleton_to_json(skel))
    values = [None, True, 0, -1, 2**70, 1.5, "", "x", "PosixPath", "__class__", "__dict__", "int", "type",
              ["type", "x"], [], ["tz", 1, 0, None], 86400, -10**9, "os.system", {"a": 1}]

    def positions(node, path=()):
        yield path
        if isinstance(node, list):
            for i, child in enumerate(node):
                yield from positions(child, path + (i,))

    paths = [p for p in positions(base["root"]) if p]
    rng = random.Random(16)
    for _ in range(2000):
        mutated = copy.deepcopy(base)
        for _ in range(rng.randint(1, 3)):
            path = rng.choice(paths)
            parent = mutated["root"]
            try:
                for step in path[:-1]:
                    parent = parent[step]
                if rng.random() < 0.2:
                    del parent[path[-1]]
                else:
                    parent[path[-1]] = copy.deepcopy(rng.choice(values))
            except (IndexError, TypeError):
                pass
        try:
            tree.validate(mutated, len(entries))
            tree.unflatten(mutated, lambda i: entries[i].tensor)
        except FormatError:
            pass
