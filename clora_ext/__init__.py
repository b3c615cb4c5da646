"""sd-webui-clora: training-free composition of several LoRAs in one image (CLoRA).

The core modules of this package are pure torch and never import the host's
``modules``; the A1111 glue lives in its own subpackage.
"""

__version__ = "0.7.0"
