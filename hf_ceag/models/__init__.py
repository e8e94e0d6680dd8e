"""Models: `classifiers` (timm and transformers image classifiers, saved so transformers and timm load
them), `cifar_resnet` (a CIFAR ResNet-56, registered with timm by `register_timm_models`).
"""
