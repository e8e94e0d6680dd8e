"""Models: `classifiers` (timm and transformers image classifiers, saved so transformers and timm load
them), `rgb_input` (a grayscale model saved to take RGB images, and loaded back as trained), `cifar_resnet` (a
CIFAR ResNet-56, registered with timm by `register_timm_models`).
"""
