"""Data: `images` (digits, image folders, Hub datasets and their transforms), `styled_digits` (the embedded
default), `face_datasets` (UTKFace, FairFace, CIFAR-100), `recipes` (the configs' data), `groups` (group
columns to integer ids, per-group counts and means), `encoding` (a dataset as the trainer sees it), `batches`
(batches fetched as columns).
"""
