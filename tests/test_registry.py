"""The one registry behind backbones, generators and sources, and plug-ins found through entry points."""

from __future__ import annotations

import logging
import sys
import textwrap
import types

import pytest
import yaml

from bench.cli import main
from bench.errors import BadInput
from bench.generators import GENERATORS, Generator, get_generator, list_generators
from bench.generators.card import read_card
from bench.manifest import read_manifest
from bench.models import BACKBONES, create_model, list_models, model_info
from bench.registry import Registry
from bench.sources import SOURCES, get_source, list_sources
from tests.conftest import TINY_TASK, make_tiny_dataset, write_tiny_task

# --- the Registry itself ------------------------------------------------------------------------------------------


def test_register_get_names_meta():
    reg: Registry[int] = Registry("colour")
    reg.register("red", 1, hue=0)

    @reg.register("blue", shade="dark")
    def blue() -> str:
        return "b"

    assert reg.names() == ["blue", "red"]
    assert reg.get("red") == 1
    assert reg.get("blue") is blue and blue() == "b"
    assert reg.meta("red") == {"hue": 0}
    assert reg.meta("blue") == {"shade": "dark"}
    assert reg.entry("red").origin == "builtin"
    assert "red" in reg and "green" not in reg
    assert list(reg) == ["blue", "red"] and len(reg) == 2
    assert reg.items() == [("blue", blue), ("red", 1)]
    reg.unregister("red")
    assert reg.names() == ["blue"]


def test_a_name_registered_twice_is_an_error_unless_it_is_the_same_object():
    reg: Registry[object] = Registry("colour")
    a, b = object(), object()
    reg.register("red", a)
    reg.register("red", a)  # a module imported twice registers the same object again
    with pytest.raises(ValueError, match="'red' is registered twice"):
        reg.register("red", b)
    assert reg.get("red") is a
    with pytest.raises(ValueError, match="non-empty"):
        reg.register("", b)


def test_unknown_name_is_bad_input_with_did_you_mean():
    reg: Registry[int] = Registry("colour")
    for i, name in enumerate(["crimson", "green", "blue"]):
        reg.register(name, i)
    with pytest.raises(BadInput) as e:
        reg.get("gren", what="--colour")
    assert (
        str(e.value) == "--colour 'gren': unknown colour; did you mean 'green'? (known: blue, crimson, green)"
    )
    # Case does not hide the closest name.
    with pytest.raises(BadInput, match="did you mean 'blue'"):
        reg.get("BLUE")
    # Nothing close: no suggestion, but every known name.
    with pytest.raises(BadInput) as e:
        reg.get("ultraviolet")
    assert "did you mean" not in str(e.value) and "(known: blue, crimson, green)" in str(e.value)


def test_coerce_rejects_objects_of_the_wrong_kind():
    def only_ints(name: str, obj: object) -> int:
        if not isinstance(obj, int):
            raise TypeError(f"{name} must be an int")
        return obj

    reg: Registry[int] = Registry("number", coerce=only_ints)
    reg.register("one", 1)
    with pytest.raises(TypeError, match="two must be an int"):
        reg.register("two", "2")
    assert reg.names() == ["one"]


def test_builtins_are_imported_on_first_use(tmp_path, monkeypatch):
    holder = types.ModuleType("toy_colour_registry")
    holder.REG = Registry("colour", builtins=("toy_builtin_colours",))
    monkeypatch.setitem(sys.modules, "toy_colour_registry", holder)
    (tmp_path / "toy_builtin_colours.py").write_text(
        "import toy_colour_registry\ntoy_colour_registry.REG.register('teal', 7)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "toy_builtin_colours", raising=False)
    assert "toy_builtin_colours" not in sys.modules
    assert holder.REG.get("teal") == 7
    assert "toy_builtin_colours" in sys.modules
    sys.modules.pop("toy_builtin_colours")


def test_every_builtin_is_registered():
    assert {"copycat", "pca-gmm", "ddpm"} <= set(list_generators())
    assert {"dicom", "ham10000", "folder"} <= set(list_sources())
    assert get_generator("pca-gmm").name == "pca-gmm"
    for reg in (GENERATORS, SOURCES, BACKBONES):
        assert all(reg.entry(n).origin == "builtin" for n in reg.names())


# --- plug-ins through entry points ---------------------------------------------------------------------------------

PLUGIN = '''
import numpy as np
import pandas as pd
from torch import nn

from bench.generators import Generator, register_generator


class ToyGenerator(Generator):
    """Every sample of class k is the constant image 40 * (k + 1)."""

    version = "0.1"
    presets = {"tiny": {"level": 40}, "full": {"level": 40}}

    def fit(self, images, labels, num_classes):
        self._shape = images.shape[1:]

    def sample(self, labels):
        labels = np.asarray(labels, dtype=int)
        out = np.empty((len(labels),) + self._shape, dtype=np.uint8)
        for i, c in enumerate(labels):
            out[i] = self.config["level"] * (c + 1)
        return out


def read_toy(task, root, options):
    """The rows of ROOT/manifest.parquet with absolute image paths."""
    df = pd.read_parquet(root / "manifest.parquet")
    df["image"] = [str(root / p) for p in df["image"]]
    return df[["case_id", "patient_id", "image", "label", "site", "sex", "age"]]


def build_toy(num_classes, in_chans):
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))


@register_generator("toy-by-decorator")
class DecoratedToy(ToyGenerator):
    pass
'''

ENTRY_POINTS = """
[medsynbench.generators]
toy = toy_medsyn_plugin:ToyGenerator
toy-module = toy_medsyn_plugin
copycat = toy_medsyn_plugin:ToyGenerator
not-a-generator = toy_medsyn_plugin:read_toy
broken = toy_medsyn_missing:Nothing

[medsynbench.sources]
toy-source = toy_medsyn_plugin:read_toy

[medsynbench.backbones]
toy-net = toy_medsyn_plugin:build_toy
"""


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """An installed-looking distribution `toy-plugin` on a temporary sys.path entry: no pip, no network."""
    site = tmp_path / "site"
    dist = site / "toy_plugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent(ENTRY_POINTS).lstrip())
    (site / "toy_medsyn_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(site))
    for reg in (GENERATORS, SOURCES, BACKBONES):
        reg.reset()
    yield site
    sys.modules.pop("toy_medsyn_plugin", None)
    for reg in (GENERATORS, SOURCES, BACKBONES):
        reg.reset()


def test_plugin_generator_source_and_backbone_are_found(plugin, caplog):
    with caplog.at_level(logging.WARNING, logger="bench.registry"):
        names = list_generators()
    assert {"toy", "toy-by-decorator", "copycat", "pca-gmm", "ddpm"} <= set(names)
    toy = get_generator("toy")
    assert toy.__module__ == "toy_medsyn_plugin" and toy.name == "toy"
    assert GENERATORS.entry("toy").origin == "plug-in toy-plugin 0.1 (toy_medsyn_plugin:ToyGenerator)"
    # A module entry point that registers with the decorator is recorded as the plug-in, not as a built-in.
    assert get_generator("toy-by-decorator").name == "toy-by-decorator"
    assert GENERATORS.entry("toy-by-decorator").origin == "plug-in toy-plugin 0.1"
    # A plug-in cannot take a built-in's name; a wrong kind of object and a broken plug-in are warnings.
    assert get_generator("copycat").__module__ == "bench.generators.copycat"
    assert "not-a-generator" not in names and "broken" not in names
    warnings = " | ".join(r.getMessage() for r in caplog.records)
    assert "'copycat' (toy_medsyn_plugin:ToyGenerator) ignored: the name is taken by builtin" in warnings
    assert "'not-a-generator'" in warnings and "must be a subclass of bench.generators.Generator" in warnings
    assert "'broken' (toy_medsyn_missing:Nothing) failed to load" in warnings

    assert "toy-source" in list_sources()
    assert get_source("toy-source").__name__ == "read_toy"

    assert "toy-net" in list_models()
    assert model_info("toy-net").family == "plug-in"
    net = create_model("toy-net", 3, 1)
    assert net.bench_spec == {"name": "toy-net", "num_classes": 3, "in_chans": 1}


def test_plugins_are_gone_after_reset_without_the_distribution(plugin, monkeypatch):
    assert "toy" in list_generators()
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(plugin)])  # "uninstalled"
    GENERATORS.reset()
    assert "toy" not in list_generators()
    assert {"copycat", "pca-gmm", "ddpm"} <= set(list_generators())


def test_plugin_source_and_generator_through_the_command_line(plugin, tmp_path, capsys):
    """`data manifest` reads through the plug-in source; `generate --generator toy` writes the full contract."""
    raw = dict(TINY_TASK, source={"kind": "toy-source", "options": {}})
    task_dir = tmp_path / "tasks" / "toy"
    task_dir.mkdir(parents=True)
    (task_dir / "task.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    from bench.tasks import load_task

    make_tiny_dataset(tmp_path / "data", load_task(task_dir), patients_per_site=4, images_per_patient=1)
    real = tmp_path / "real.parquet"
    assert (
        main(
            [
                "data",
                "manifest",
                "--task",
                str(task_dir),
                "--root",
                str(tmp_path / "data"),
                "--out",
                str(real),
            ]
        )
        == 0
    )
    assert len(read_manifest(real).df) == 4 * len(
        TINY_TASK["sites"]["train"] + TINY_TASK["sites"]["external"]
    )

    out = tmp_path / "toy-out"
    args = ["generate", "--task", str(task_dir), "--generator", "toy", "--real", str(real), "--out", str(out)]
    assert main(args + ["--per-class", "2"]) == 0
    syn = read_manifest(out / "manifest.parquet").df
    assert set(syn["generator"]) == {"toy"} and len(syn) == 6
    card = read_card(out / "card.yaml")
    assert (card.name, card.version) == ("toy", "0.1")


def test_unknown_generator_on_the_command_line_is_exit_2_with_did_you_mean(tiny_task_path, tmp_path, capsys):
    args = ["generate", "--task", str(tiny_task_path), "--generator", "copycatt"]
    rc = main(args + ["--real", str(tmp_path / "none.parquet"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--generator 'copycatt': unknown generator; did you mean 'copycat'?" in err


def test_unknown_source_kind_names_the_task_file_and_suggests(tmp_path, capsys):
    raw = dict(TINY_TASK, source={"kind": "foldr", "options": {}})
    path = write_tiny_task(tmp_path)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    (tmp_path / "data").mkdir()
    rc = main(["data", "manifest", "--task", str(path), "--root", str(tmp_path / "data")])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{path.resolve()}: field 'source.kind' 'foldr': unknown source; did you mean 'folder'?" in err


def test_unknown_backbone_suggests_the_closest():
    with pytest.raises(BadInput, match=r"backbone 'resnet81': unknown backbone; did you mean 'resnet18'"):
        create_model("resnet81", 3, 1)


def test_a_plugin_class_that_is_no_generator_is_refused_by_the_decorator():
    from bench.generators import register_generator

    with pytest.raises(TypeError, match="subclass of bench.generators.Generator"):
        register_generator("not-a-class")(lambda: None)
    assert "not-a-class" not in list_generators()
    assert issubclass(get_generator("copycat"), Generator)


def test_a_plugin_source_is_the_function_its_entry_point_names(plugin):
    fn = get_source("toy-source")
    assert sys.modules["toy_medsyn_plugin"].read_toy is fn
    assert SOURCES.entry("toy-source").origin == "plug-in toy-plugin 0.1 (toy_medsyn_plugin:read_toy)"
