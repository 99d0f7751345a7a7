"""`ResNetClassifier`: backbone + global pooling + dropout + dense."""

import keras
from keras import layers

from keras_resnet.layers.core import ImageNormalization
from keras_resnet.models.task import Task
from keras_resnet_settings.errors import ConfigError

POOLINGS = ("avg", "max")


@keras.saving.register_keras_serializable(package="keras_resnet")
class ResNetClassifier(Task):
    """An image classifier on top of any `ResNetBackbone`.

    The graph is `images -> [preprocessing] -> backbone -> pooling ->
    dropout -> dense`. With a `preprocessing` layer inside (e.g.
    `ImageNormalization`), the model takes raw pixel values 0-255, so users
    of the model and of its exports never need the training normalisation.
    The dense layer is named "predictions" and computes in float32 (stable
    under mixed precision).

    Args:
        backbone: a `ResNetBackbone` (its `image_shape` is the input shape).
        num_classes: number of output classes.
        pooling: "avg" or "max" global pooling.
        dropout: dropout rate before the dense layer.
        activation: output activation; "softmax" (default), "sigmoid", or
            None for logits.
        preprocessing: None, or a Keras layer applied to the input images
            (serialised with the model).
        name: model name.

    Example:
    >>> model = ResNetClassifier.from_preset("resnet18", num_classes=10, input_shape=(32, 32, 3))
    >>> model.predict(np.zeros((2, 32, 32, 3)), verbose=0).shape
    (2, 10)
    """

    TASK_ARGS = ("pooling", "dropout", "activation", "preprocessing", "name")

    def __init__(
        self,
        backbone,
        num_classes,
        pooling="avg",
        dropout=0.0,
        activation="softmax",
        preprocessing=None,
        name="resnet_classifier",
        **kwargs,
    ):
        if not isinstance(backbone, keras.Model):
            raise ConfigError(f"backbone must be a ResNetBackbone (a keras.Model), got {type(backbone).__name__}.")
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling={pooling!r} is not supported; allowed values: {POOLINGS}.")
        if int(num_classes) < 1:
            raise ConfigError(f"num_classes must be >= 1, got {num_classes}.")
        if not 0 <= dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout}.")
        inputs = keras.Input(shape=backbone.input_shape[1:], name="images")
        x = preprocessing(inputs) if preprocessing is not None else inputs
        x = backbone(x)
        if pooling == "avg":
            x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        else:
            x = layers.GlobalMaxPooling2D(name="max_pool")(x)
        if dropout:
            x = layers.Dropout(dropout, name="head_dropout")(x)
        outputs = layers.Dense(num_classes, activation=activation, dtype="float32", name="predictions")(x)
        super().__init__(inputs=inputs, outputs=outputs, name=name, **kwargs)
        self.backbone = backbone
        self.num_classes = int(num_classes)
        self.pooling = pooling
        self.dropout = dropout
        self.activation = activation
        self.preprocessing = preprocessing

    def get_config(self):
        return {
            **self.task_config(),
            "pooling": self.pooling,
            "dropout": self.dropout,
            "activation": self.activation,
        }

    @classmethod
    def from_preset(cls, preset, num_classes=1000, weights=None, **overrides):
        """Builds a classifier on a named backbone preset.

        Args:
            preset: a name from `keras_resnet.list_presets()`.
            num_classes: number of output classes.
            weights: None, a catalogue name ("imagenet", "torchvision:IMAGENET1K_V2",
                "timm:a1_in1k", "keras_applications"; see `ResNetBackbone.from_preset`),
                or pretrained weights of the preset's architecture. The
                backbone is loaded; the head too when the source has one
                with `num_classes` classes, else the head is fresh. Unless
                `preprocessing` is given, the source's input normalisation
                goes inside the model, which then takes raw pixels 0-255.
            **overrides: classifier arguments (`pooling`, `dropout`,
                `activation`, `preprocessing`, `name`) and backbone
                arguments (anything else, e.g. `input_shape`).

        Example:
        >>> model = ResNetClassifier.from_preset("resnet50", weights="imagenet")  # 1000 ImageNet classes
        >>> model = ResNetClassifier.from_preset("resnet50", weights="resnet50.pth", num_classes=10)
        """
        backbone, classifier_args, pretrained = cls.backbone_from_preset(preset, overrides, weights)
        classifier_args.setdefault("name", f"{preset}_classifier")
        model = cls(backbone, num_classes, **classifier_args)
        if pretrained is not None and pretrained.num_classes == num_classes:
            pretrained.load_head(model.get_layer("predictions"))
        return model


__all__ = ["ResNetClassifier", "ImageNormalization"]
