"""The one error type for a config.json nextserve cannot serve (model/config.py and model/quantization.py
raise it; the CLI prints it as one line, exit 2)."""


class ConfigError(ValueError):
    """A config.json that nextserve cannot serve; the message names the field and the fix."""
