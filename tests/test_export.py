"""The exported SavedModel as a server sees it (fresh process), version numbers, atomicity."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from mnist_serving.contract import REPORT, REPORT_DIR, TWIN, existing_versions, next_version
from mnist_serving.trainer import export
from mnist_serving.trainer.export import export_saved_model

from .synthetic_mnist import make_arrays

PROBE = Path(__file__).resolve().parent / "savedmodel_probe.py"
TWIN_PROBE = Path(__file__).resolve().parent / "twin_probe.py"


def probe(
    version_dir: Path, images: npt.NDArray[np.uint8], out_dir: Path, script: Path = PROBE
) -> dict[str, Any]:
    """Run savedmodel_probe.py on `images` in a fresh process; its signatures and outputs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / "images.npy", images)
    result = subprocess.run(
        [sys.executable, str(script), str(version_dir), str(out_dir / "images.npy"), str(out_dir)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(out_dir / "outputs.npz") as outputs:
        found: dict[str, Any] = dict(outputs)
    for name in ("signatures", "modules"):
        if (out_dir / f"{name}.json").exists():
            found[name] = json.loads((out_dir / f"{name}.json").read_text())
    return found


def check_twin_agrees(version_dir: Path, images: npt.NDArray[np.uint8], tmp_path: Path) -> None:
    """The twin, loaded without TensorFlow in a fresh process, gives the SavedModel's answers
    (itself loaded in another fresh process): identical classes, probabilities within the
    trainer's TWIN_TOLERANCE."""
    saved = probe(version_dir, images, tmp_path / "savedmodel")
    twin = probe(version_dir, images, tmp_path / "twin", script=TWIN_PROBE)
    assert twin["modules"] == {"tensorflow": []}
    for prefix in ("uint8", "float"):
        np.testing.assert_array_equal(twin[f"{prefix}_classes"], saved[f"{prefix}_classes"])
        np.testing.assert_allclose(
            twin[f"{prefix}_probabilities"],
            saved[f"{prefix}_probabilities"],
            rtol=0,
            atol=export.TWIN_TOLERANCE,
        )


def check_served_contract(found: dict[str, Any], count: int) -> None:
    """What the server and clients rely on: names, dtypes, shapes, consistent outputs."""
    signatures = found["signatures"]
    assert set(signatures) == {"serving_default", "serving_float"}
    for name, dtype in [("serving_default", "uint8"), ("serving_float", "float32")]:
        assert signatures[name]["inputs"] == {"images": {"dtype": dtype, "shape": [None, 28, 28]}}
        assert signatures[name]["outputs"] == {
            "probabilities": {"dtype": "float32", "shape": [None, 10]},
            "classes": {"dtype": "int64", "shape": [None]},
        }
    for prefix in ("uint8", "float"):
        probabilities = found[f"{prefix}_probabilities"]
        classes = found[f"{prefix}_classes"]
        assert probabilities.shape == (count, 10)
        assert probabilities.dtype == np.float32
        assert classes.dtype == np.int64
        assert (probabilities >= 0).all()
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
        np.testing.assert_array_equal(classes, probabilities.argmax(axis=1))
    np.testing.assert_allclose(
        found["uint8_probabilities"], found["float_probabilities"], rtol=0, atol=1e-6
    )
    np.testing.assert_array_equal(found["uint8_classes"], found["float_classes"])


# --- the SavedModel, loaded in a fresh process --------------------------------------------


@pytest.fixture(scope="module")
def small_trained_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Any]:
    """A model fitted in-process on generated data, exported; its own Keras predictions."""
    from mnist_serving.contract.tfquiet import import_tensorflow
    from mnist_serving.trainer.data import scale
    from mnist_serving.trainer.model import build_model

    tf = import_tensorflow()
    tf.keras.utils.set_random_seed(1)
    arrays = make_arrays(train=300, test=64)
    model = build_model("mlp")
    model.fit(scale(arrays["x_train"]), arrays["y_train"], epochs=2, batch_size=32, verbose=0)
    keras_probabilities = tf.nn.softmax(model.predict(scale(arrays["x_test"]), verbose=0)).numpy()
    version_dir = export_saved_model(
        model, tmp_path_factory.mktemp("small") / "mnist", check_images=arrays["x_test"]
    )
    return version_dir, arrays["x_test"], keras_probabilities


def test_small_export_serves_the_contract_and_matches_keras(
    small_trained_export: tuple[Path, Any, Any], tmp_path: Path
) -> None:
    version_dir, images, keras_probabilities = small_trained_export
    assert version_dir.name == "1"
    found = probe(version_dir, images, tmp_path)
    check_served_contract(found, len(images))
    # Trained, so the comparison means something: confident and not all one class.
    assert len(set(found["uint8_classes"].tolist())) == 10
    np.testing.assert_allclose(found["uint8_probabilities"], keras_probabilities, atol=1e-6)
    np.testing.assert_allclose(found["float_probabilities"], keras_probabilities, atol=1e-6)


@pytest.mark.slow
def test_real_export_serves_the_contract_and_its_metrics(
    trained_model_dir: Path, mnist_path: Path, tmp_path: Path
) -> None:
    """The exported model classifies the test set exactly as metrics.json says it does."""
    with np.load(mnist_path) as data:
        images, labels = data["x_test"], data["y_test"]
    found = probe(trained_model_dir / "1", images, tmp_path)
    check_served_contract(found, len(images))
    metrics = json.loads((trained_model_dir / "1" / REPORT_DIR / "metrics.json").read_text())
    served_accuracy = float((found["uint8_classes"] == labels).mean())
    assert served_accuracy == pytest.approx(metrics["test_accuracy"], abs=1e-6)


# --- the LiteRT twin ----------------------------------------------------------------------


@pytest.mark.slow
def test_a_default_training_run_publishes_a_verified_twin(
    trained_model_dir: Path, mnist_path: Path, tmp_path: Path
) -> None:
    """`mnist-train` checked the twin on the 10k test images; a fresh process without
    TensorFlow finds the same answers as the SavedModel."""
    version_dir = trained_model_dir / "1"
    twin = json.loads((version_dir / REPORT).read_text())["twin"]
    assert twin["published"] is True
    assert twin["check_images"] == 10000
    assert twin["check_source"] == "test images"
    assert twin["classes_identical"] is True
    assert twin["classes_agreement"] == 1.0
    assert 0 <= twin["max_abs_difference"] <= export.TWIN_TOLERANCE
    assert set(twin["signatures"]) == {"serving_default", "serving_float"}
    with np.load(mnist_path) as data:
        images = data["x_test"]
    check_twin_agrees(version_dir, images, tmp_path)


def test_small_export_has_a_twin_that_agrees_without_tensorflow(
    small_trained_export: tuple[Path, Any, Any], tmp_path: Path
) -> None:
    version_dir, images, _ = small_trained_export
    assert (version_dir / TWIN).exists()
    twin = json.loads((version_dir / REPORT).read_text())["twin"]
    assert twin["published"] is True
    assert twin["check_source"] == "test images"
    assert twin["check_images"] == len(images)
    assert twin["max_abs_difference"] <= export.TWIN_TOLERANCE
    check_twin_agrees(version_dir, images, tmp_path)


def test_a_twin_that_disagrees_is_not_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from mnist_serving.trainer.model import build_model

    monkeypatch.setattr(export, "TWIN_TOLERANCE", -1.0)  # no twin can be that close
    with caplog.at_level("WARNING", logger=export.__name__):
        version_dir = export_saved_model(build_model("mlp"), tmp_path)
    assert (version_dir / "saved_model.pb").exists()  # the version is still exported
    assert not (version_dir / TWIN).exists()
    twin = json.loads((version_dir / REPORT).read_text())["twin"]
    assert twin["published"] is False
    assert "disagrees with the SavedModel" in twin["reason"]
    assert any("LiteRT twin not published" in r.getMessage() for r in caplog.records)


def test_the_check_refuses_a_twin_that_computes_something_slightly_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A twin of the same model with one output bias moved by 2e-4 (every class still the
    same, probabilities near 0.1 moved by about 0.1 * 0.9 * 2e-4 = 1.8e-5) is refused: the
    tolerance sits between float32's noise and the smallest fault worth catching."""
    from mnist_serving.trainer.model import build_model

    model = build_model("mlp")
    shifted = build_model("mlp")
    weights = model.get_weights()
    weights[-1] = weights[-1].copy()
    weights[-1][3] += 2e-4
    shifted.set_weights(weights)
    flatbuffer = export.convert(export_saved_model(shifted, tmp_path / "shifted", twin=False))
    monkeypatch.setattr(export, "convert", lambda saved_model_dir, verbose=False: flatbuffer)
    version_dir = export_saved_model(model, tmp_path / "model")
    twin = json.loads((version_dir / REPORT).read_text())["twin"]
    assert twin["published"] is False
    assert twin["classes_identical"] is True
    assert export.TWIN_TOLERANCE < twin["max_abs_difference"] < 1e-4
    assert not (version_dir / TWIN).exists()


def test_a_twin_that_fails_to_convert_is_not_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mnist_serving.trainer.model import build_model

    def broken(saved_model_dir: Path, verbose: bool = False) -> bytes:
        raise RuntimeError("converter exploded\nsecond line")

    monkeypatch.setattr(export, "convert", broken)
    version_dir = export_saved_model(build_model("mlp"), tmp_path)
    assert (version_dir / "saved_model.pb").exists()
    assert not (version_dir / TWIN).exists()
    twin = json.loads((version_dir / REPORT).read_text())["twin"]
    assert twin["reason"] == "conversion failed: RuntimeError: converter exploded"


def test_export_without_a_twin_when_asked(tmp_path: Path) -> None:
    from mnist_serving.trainer.model import build_model

    version_dir = export_saved_model(build_model("mlp"), tmp_path, twin=False)
    assert not (version_dir / TWIN).exists()
    assert not (version_dir / REPORT).exists()  # no report was asked for either


# --- version numbers ----------------------------------------------------------------------


def test_versions_are_positive_integer_folders_only(tmp_path: Path) -> None:
    assert existing_versions(tmp_path / "absent") == []
    assert next_version(tmp_path / "absent") == 1
    for name in ["1", "2", "10", "0", "007", "-3", "v4", ".tmp-11-abc", "latest"]:
        (tmp_path / name).mkdir()
    (tmp_path / "12").write_text("a file, not a version")
    assert existing_versions(tmp_path) == [1, 2, 10]
    assert next_version(tmp_path) == 11


def test_export_takes_next_free_then_explicit_version(tmp_path: Path) -> None:
    from mnist_serving.trainer.model import build_model

    model = build_model("mlp")
    model_dir = tmp_path / "mnist"
    assert export_saved_model(model, model_dir) == model_dir / "1"
    assert export_saved_model(model, model_dir) == model_dir / "2"
    assert export_saved_model(model, model_dir, version=7) == model_dir / "7"
    assert export_saved_model(model, model_dir) == model_dir / "8"
    assert existing_versions(model_dir) == [1, 2, 7, 8]
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "2", "7", "8"]
    mode = stat.S_IMODE((model_dir / "8").stat().st_mode)
    assert mode & 0o055 == 0o055, oct(mode)  # readable by a server running as another user


def test_existing_version_is_refused_and_left_alone(tmp_path: Path) -> None:
    from mnist_serving.trainer.model import build_model

    model_dir = tmp_path / "mnist"
    existing = model_dir / "3"
    existing.mkdir(parents=True)
    (existing / "marker").write_text("keep me")
    with pytest.raises(FileExistsError, match="already exists"):
        export_saved_model(build_model("mlp"), model_dir, version=3)
    assert sorted(p.name for p in model_dir.iterdir()) == ["3"]
    assert (existing / "marker").read_text() == "keep me"
    with pytest.raises(ValueError, match="positive"):
        export_saved_model(build_model("mlp"), model_dir, version=0)


# --- atomicity ----------------------------------------------------------------------------


@pytest.mark.parametrize("failure", [RuntimeError, KeyboardInterrupt])
def test_interrupted_export_leaves_nothing_visible(
    tmp_path: Path, failure: type[BaseException]
) -> None:
    from mnist_serving.trainer.model import build_model

    model_dir = tmp_path / "mnist"
    seen: list[Path] = []

    def write_extras(folder: Path) -> None:
        (folder / "metrics.json").write_text("{}")
        seen.append(folder)
        # While the report is written, the model is already on disk, but only under a
        # hidden name a server ignores.
        assert existing_versions(model_dir) == []
        assert (folder.parent / "saved_model.pb").exists()
        assert folder.parent.name.startswith(".")
        raise failure("interrupted")

    with pytest.raises(failure, match="interrupted"):
        export_saved_model(build_model("mlp"), model_dir, write_extras=write_extras)
    assert seen, "write_extras was not called"
    assert list(model_dir.iterdir()) == []  # no version, no leftover temporary folder


def test_report_appears_with_the_model(tmp_path: Path) -> None:
    from mnist_serving.trainer.model import build_model

    def write_extras(folder: Path) -> None:
        (folder / "metrics.json").write_text('{"version": 1}')

    version_dir = export_saved_model(build_model("mlp"), tmp_path, write_extras=write_extras)
    report = json.loads((version_dir / REPORT_DIR / "metrics.json").read_text())
    assert report["version"] == 1  # the caller's report, with the twin's check added
    assert report["twin"]["published"] is True
    assert (version_dir / "saved_model.pb").exists()
    assert (version_dir / TWIN).exists()
