"""A grayscale model is saved to take RGB images (so `pipeline` works on PIL images and image files, which it
converts to RGB) and loads back, in hf-ceag, as the 1-channel model it trained, bit for bit."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification, pipeline

from hf_ceag import CEAGTrainer, build_classifier, image_processor, load_classifier
from hf_ceag.data.images import DIGITS_MEAN, DIGITS_STD
from hf_ceag.models.classifiers import save_loadable
from hf_ceag.models.rgb_input import RGB_INPUT_KEY, grayscale_stem


def saved(tmp_path, name, channels=1):
    torch.manual_seed(0)
    model = build_classifier(name, num_labels=10, channels=channels, image_size=16).eval()
    folder = tmp_path / name
    model.save_pretrained(folder)
    image_processor(16, channels, digits=channels == 1).save_pretrained(folder)
    save_loadable(str(folder), model)
    return model, folder


@pytest.mark.parametrize("name", ["test_resnet", "resnet", "vit"])  # timm, transformers conv, transformers ViT
def test_a_grayscale_model_is_saved_for_rgb_and_loads_back_bit_for_bit(tmp_path, name):
    model, folder = saved(tmp_path, name)
    stem = grayscale_stem(model)
    grey = model.get_submodule(stem).weight.detach()
    assert grey.shape[1] == 1

    # the file: the first layer's weights by hand, three channels in the config and the image processor
    state = load_file(folder / "model.safetensors")
    widened = [v for v in state.values() if v.shape == (grey.shape[0], 3, *grey.shape[2:])]
    assert len(widened) == 1
    assert torch.equal(widened[0], torch.cat([grey / 4, grey / 2, grey / 4], dim=1))
    config = json.loads((folder / "config.json").read_text())
    assert config[RGB_INPUT_KEY]["module"] == stem
    assert config.get("num_channels", (config.get("model_args") or {}).get("in_chans")) == 3
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == [DIGITS_MEAN] * 3 and processor["image_std"] == [DIGITS_STD] * 3

    # transformers alone: an RGB model that gives a grey image's logits
    x = torch.randn(4, 1, 16, 16)
    plain = AutoModelForImageClassification.from_pretrained(folder, use_safetensors=True).eval()
    with torch.no_grad():
        expected = model(pixel_values=x).logits
        torch.testing.assert_close(plain(pixel_values=x.expand(-1, 3, -1, -1)).logits, expected)

    # hf-ceag: the trained 1-channel model, every tensor equal
    back = load_classifier(str(folder)).eval()
    assert not hasattr(back.config, RGB_INPUT_KEY)
    assert (getattr(back.config, "num_channels", None) or back.config.model_args["in_chans"]) == 1
    assert back.get_submodule(stem).in_channels == 1
    trained, loaded = model.state_dict(), back.state_dict()
    assert trained.keys() == loaded.keys()
    assert all(torch.equal(trained[k], loaded[k]) for k in trained)
    with torch.no_grad():
        assert torch.equal(back(pixel_values=x).logits, expected)
    # and saving it again writes the same folder
    again = tmp_path / "again"
    back.save_pretrained(again)
    save_loadable(str(again), back)
    assert load_file(again / "model.safetensors").keys() == state.keys()
    assert all(torch.equal(load_file(again / "model.safetensors")[k], v) for k, v in state.items())


def test_pipeline_takes_grey_and_colour_images_and_files(tmp_path, check_pipeline):
    model, folder = saved(tmp_path, "vit")  # an untrained ViT's logits differ between images (test_resnet's: 1e-7)
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, size=(6, 16, 16, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, size=(6, 16, 16), dtype=np.uint8)

    def pixel_values(levels):  # the digits' normalisation, on float grey levels in [0, 255]
        return ((torch.as_tensor(levels, dtype=torch.float32) / 255 - DIGITS_MEAN) / DIGITS_STD).unsqueeze(1)

    # grey images (PIL and files, 16 px so the resize keeps every pixel): the trained model's own predictions
    images = [Image.fromarray(g, mode="L") for g in grey]
    images[0].save(tmp_path / "grey.png")
    check_pipeline(folder, [*images, str(tmp_path / "grey.png")], pixel_values(np.concatenate([grey, grey[:1]])))
    # a colour image is seen as its grey level (R + 2G + B) / 4 (raw logits compared)
    rgb = colour.astype(np.float64)
    levels = (rgb[..., 0] + 2 * rgb[..., 1] + rgb[..., 2]) / 4
    classifier = pipeline("image-classification", model=str(folder), device="cpu")
    seen = classifier([Image.fromarray(c, mode="RGB") for c in colour], top_k=10, function_to_apply="none")
    seen = torch.tensor(
        [[p["score"] for p in sorted(row, key=lambda p: model.config.label2id[p["label"]])] for row in seen]
    )
    with torch.no_grad():
        expected = model(pixel_values=pixel_values(levels)).logits
    assert (expected - expected.mean(0)).abs().max() > 0.1  # the images give different logits
    torch.testing.assert_close(seen, expected, rtol=0, atol=1e-4)


def test_models_that_take_colour_are_saved_as_they_are(tmp_path):
    model, folder = saved(tmp_path, "test_resnet", channels=3)
    assert grayscale_stem(model) is None
    assert RGB_INPUT_KEY not in json.loads((folder / "config.json").read_text())
    state = load_file(folder / "model.safetensors")
    assert all(torch.equal(state[k.removeprefix("timm_model.")], v) for k, v in model.state_dict().items())


def test_the_trainer_narrows_a_published_grayscale_model_given_grayscale_data(tmp_path, digits, make_config):
    model, folder = saved(tmp_path, "test_resnet")
    published = AutoModelForImageClassification.from_pretrained(folder, use_safetensors=True)
    assert published.config.model_args["in_chans"] == 3
    parameters = list(published.parameters())  # what an optimizer built before the trainer holds
    trainer = CEAGTrainer(published, make_config(max_steps=1), train_dataset=digits["train"])
    assert [id(p) for p in trainer.model.parameters()] == [id(p) for p in parameters]
    assert trainer.model.config.model_args["in_chans"] == 1
    trained = model.state_dict()
    assert all(torch.equal(trained[k], v.cpu()) for k, v in trainer.model.state_dict().items())


def test_a_published_model_trained_further_on_colour_stays_an_rgb_model(tmp_path):
    _, folder = saved(tmp_path, "resnet")
    colour = AutoModelForImageClassification.from_pretrained(folder, use_safetensors=True)
    stem = colour.get_submodule(json.loads((folder / "config.json").read_text())[RGB_INPUT_KEY]["module"])
    with torch.no_grad():
        stem.weight[:, 0] += 0.01  # red learned something of its own
    colour.save_pretrained(tmp_path / "colour")  # the marker stays in its config
    loaded = load_classifier(str(tmp_path / "colour"))
    assert loaded.config.num_channels == 3 and torch.equal(
        loaded.get_submodule(stem_name(loaded)).weight, stem.weight
    )
    # and one published from grayscale, to take colour images now, when asked
    as_rgb = load_classifier(str(folder), grayscale=False)
    assert as_rgb.config.num_channels == 3 and as_rgb.get_submodule(stem_name(as_rgb)).in_channels == 3


def stem_name(model):
    return next(n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d))
