"""Models: `classifiers` (timm and transformers image classifiers, saved so transformers and timm load
them), `rgb_input` (a grayscale model saved to take RGB images, and loaded back as trained), `cifar_resnet` (a
CIFAR ResNet-56, registered with timm by `register_timm_models`), `cpu_bf16` (bf16 autocast on a CPU without
oneDNN's NaN weight gradients of strided convolutions on 1×1 inputs).
"""
