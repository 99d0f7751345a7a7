"""The export options checked against their declarations (`keras_resnet_settings.ExportSettings`)."""

from keras_resnet_settings import ExportSettings, check_export_settings, settings_from
from keras_resnet_settings.errors import ConfigError, ExportError


def check_options(**options) -> ExportSettings:
    """`ExportSettings` of `options` (the rest at their defaults); every problem in one ExportError.

    >>> check_options(format="tflite", quantize="int8", io="uint8").io
    'uint8'
    """
    try:
        settings = settings_from(ExportSettings, options, "the export_model arguments")
        check_export_settings(settings)
    except ConfigError as error:
        raise ExportError(str(error)) from None
    return settings
