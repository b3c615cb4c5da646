"""The UNet replacement slot (TensorRT and the like), like ``modules.sd_unet``."""

current_unet = None
