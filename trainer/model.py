"""The networks the trainer fits. Both take float32 [N, 28, 28] in [0, 1] and return logits."""

from __future__ import annotations

from typing import Any

from mnist_serving.contract import IMAGE_SIDE, INPUT_NAME, NUM_CLASSES
from mnist_serving.contract.tfquiet import import_tensorflow

ARCHITECTURES = ("mlp", "cnn")


def build_model(arch: str = "mlp") -> Any:
    """Compile the chosen network: "mlp" (the reference one) or "cnn" (reaches >= 0.99)."""
    tf = import_tensorflow()
    keras = tf.keras
    layers = keras.layers
    if arch == "mlp":
        body = [
            layers.Flatten(),
            layers.Dense(128, activation="relu"),
            layers.Dense(NUM_CLASSES),
        ]
    elif arch == "cnn":
        body = [
            layers.Reshape((IMAGE_SIDE, IMAGE_SIDE, 1)),
            layers.Conv2D(32, 3, activation="relu"),
            layers.MaxPooling2D(),
            layers.Conv2D(64, 3, activation="relu"),
            layers.MaxPooling2D(),
            layers.Flatten(),
            layers.Dropout(0.3),
            layers.Dense(128, activation="relu"),
            layers.Dense(NUM_CLASSES),
        ]
    else:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    model = keras.Sequential(
        [keras.Input((IMAGE_SIDE, IMAGE_SIDE), name=INPUT_NAME), *body], name=f"mnist_{arch}"
    )
    model.compile(
        optimizer=keras.optimizers.Adam(),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model
