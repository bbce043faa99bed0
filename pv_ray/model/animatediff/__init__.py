"""AnimateDiff (SD1.5 UNet + MotionAdapter), the first `VideoBackbone` family: its loader, style
LoRAs, ControlNet and the kohya export of its adapters."""
