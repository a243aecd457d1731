"""The package's layering: every import points down, no circles, inference never loads the trainer."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import import_graph  # noqa: E402


def test_imports_point_down_with_no_circles_and_inference_loads_no_training_module():
    report = import_graph.report(REPO)
    assert report["upward_imports"] == []
    assert report["circles"] == []
    for module, loaded in report["loads"].items():
        assert module in loaded
        assert [m for m in loaded if import_graph.layer(m) == "training"] == [], module


def test_the_checker_finds_an_upward_import_and_a_circle(tmp_path):
    package = tmp_path / "magnet_jax"
    for folder in ("models", "training"):
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "models" / "lm.py").write_text("def f():\n    from magnet_jax.training import train_lib\n")
    (package / "training" / "train_lib.py").write_text("from magnet_jax.models.lm import f\n")
    report = import_graph.report(tmp_path, loads=False)
    assert report["upward_imports"] == ["magnet_jax.models.lm (models) -> magnet_jax.training.train_lib (training)"]
    assert report["circles"] == [["magnet_jax.models.lm", "magnet_jax.training.train_lib"]]
