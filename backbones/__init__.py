"""Encoders both stages use: the ResNet-50 image backbone (torchvision's parameter names) and the ResNet-PointNet
scene encoder. Neither knows which stage it serves; the stages import them from here."""
