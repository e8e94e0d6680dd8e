import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def digits():
    from hf_ceag import load_digits_dataset

    return load_digits_dataset(image_size=16, rare_groups=(3, 8))


@pytest.fixture
def tiny_model():
    from transformers import set_seed

    from hf_ceag import build_classifier

    set_seed(0)
    return build_classifier("test_resnet", num_labels=10, channels=1)


@pytest.fixture
def make_config(tmp_path):
    from hf_ceag import CEAGConfig

    def make(**overrides):
        values = {
            "output_dir": str(tmp_path / "out"),
            "max_steps": 12,
            "per_device_train_batch_size": 32,
            "per_device_eval_batch_size": 256,
            "learning_rate": 0.01,
            "optim": "sgd",
            "optim_args": "momentum=0.9",
            "pruning_end_epoch": 0.2,
            "pruning_frequency": 2,
            "target_sparsity": 0.8,
            "buffer_size": 4,
            "logging_steps": 4,
            "save_strategy": "no",
            "report_to": "none",
            "disable_tqdm": True,
            "seed": 0,
            "allow_weak_dense_model": True,  # most tests prune an untrained model: the guard has its own tests
        }
        values.update(overrides)
        return CEAGConfig(**values)

    return make


@pytest.fixture(scope="session")
def check_pipeline():
    """`check(folder, images, pixel_values, atol)`: `transformers.pipeline("image-classification", folder)` on
    `images` (PIL images, files, arrays) gives the saved model's own predictions on the `pixel_values` it was
    trained and evaluated on (top label wherever the model is not torn between two classes, and scores within
    `atol`). The model is the one hf-ceag trained (`load_classifier`: a grayscale one with 1 channel)."""

    def check(folder, images, pixel_values, atol=1e-5):
        import torch
        from transformers import pipeline

        from hf_ceag import load_classifier

        classifier = pipeline("image-classification", model=str(folder), device="cpu")
        model = load_classifier(str(folder)).eval()
        with torch.no_grad():
            own = model(pixel_values=pixel_values).logits.softmax(-1)
        top2 = own.topk(2, dim=-1).values
        for i, predicted in enumerate(classifier(list(images), top_k=model.config.num_labels)):
            scores = torch.tensor(
                [p["score"] for p in sorted(predicted, key=lambda p: model.config.label2id[p["label"]])]
            )
            torch.testing.assert_close(scores, own[i], rtol=0, atol=atol)
            if top2[i, 0] - top2[i, 1] > 2 * atol:
                assert model.config.label2id[predicted[0]["label"]] == int(own[i].argmax()), i
        return classifier

    return check
