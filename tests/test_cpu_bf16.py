"""`--bf16 true` on a CPU: the default recipe trains (oneDNN's bf16 weight gradient of a strided convolution on a
1×1 input holds NaN in about one pass in four; `hf_ceag.models.cpu_bf16` keeps those convolutions in fp32)."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from hf_ceag.models.cpu_bf16 import CpuBf16SafeConv2d, protect_cpu_bf16_convolutions

run_ceag = pytest.importorskip("scripts.run_ceag")


def test_a_strided_convolution_on_a_1x1_input_has_the_fp32_weight_gradient_under_cpu_bf16():
    torch.manual_seed(0)
    x = torch.relu(torch.randn(64, 192, 1, 1)).bfloat16().float()  # what autocast would feed it
    upstream = torch.randn(64, 96, 1, 1)
    reference = nn.Conv2d(192, 96, 3, stride=2, padding=1, bias=False)
    reference(x).backward(upstream)  # fp32: only the centre tap sees the input, every other tap's gradient is 0
    grads = []
    for _ in range(30):  # unprotected, about 7 of 30 passes give NaN in the padding taps
        conv = nn.Conv2d(192, 96, 3, stride=2, padding=1, bias=False)
        conv.load_state_dict(reference.state_dict())
        protect_cpu_bf16_convolutions(conv)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(x.bfloat16())
        out.backward(upstream.to(out.dtype))
        grads.append(conv.weight.grad)
    assert sum(not torch.isfinite(grad).all() for grad in grads) == 0
    for grad in grads:
        torch.testing.assert_close(grad, reference.weight.grad)


def test_protection_keeps_the_weights_and_leaves_unstrided_convolutions_and_fp32_alone():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4, 2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert protect_cpu_bf16_convolutions(model) == ["0"]
    assert type(model[0]) is CpuBf16SafeConv2d and isinstance(model[0], nn.Conv2d) and type(model[1]) is nn.Conv2d
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    x = torch.randn(2, 1, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model[0](x).dtype == torch.bfloat16  # inputs larger than the stride stay in bf16
        assert model[0](x[..., :1, :1]).dtype == torch.float32
    assert model[0](x[..., :1, :1]).dtype == torch.float32


def test_the_default_recipe_trains_in_bf16_on_a_cpu(tmp_path):
    """The styled-digits default under `--bf16 true --use_cpu true`, shortened: dense training used to stop at a
    non-finite grad_norm within its first ten steps."""
    out = tmp_path / "bf16"
    reports = run_ceag.main(
        ["--output_dir", str(out), "--bf16", "true", "--use_cpu", "true", "--dense_epochs", "0.2",
         "--num_train_epochs", "0.3", "--pruning_end_epoch", "0.1", "--logging_steps", "2", "--methods", "ceag",
         "--disable_tqdm", "true", "--allow_weak_dense_model", "true"]  # 0.2 epochs: barely trained
    )  # fmt: skip
    assert json.loads((out / "ceag" / "run_config.json").read_text())["bf16"]
    for name in ("dense", "ceag"):  # NonFiniteGuard read the loss and grad_norm every 2 steps; the weights too
        weights = load_file(out / name / "model.safetensors")
        assert all(torch.isfinite(w).all() for w in weights.values()), name
    assert reports["ceag"]["sparsity"] == pytest.approx(run_ceag.RECIPE_DEFAULTS["target_sparsity"], abs=1e-3)


def test_ceag_trainer_protects_the_convolutions_of_a_bf16_run_on_a_cpu(digits, make_config):
    """From Python as from the command line: a CEAGTrainer asked for bf16 on a CPU makes the strided convolutions
    safe (`protect_for_cpu_bf16`); in fp32 the model is left as given."""
    from hf_ceag import CEAGTrainer, build_classifier
    from hf_ceag.models.cpu_bf16 import CpuBf16SafeConv2d

    for bf16 in (True, False):
        model = build_classifier("test_resnet", 10, channels=1)
        CEAGTrainer(model, make_config(bf16=bf16, use_cpu=True), train_dataset=digits["train"])
        safe = [n for n, m in model.named_modules() if isinstance(m, CpuBf16SafeConv2d)]
        assert bool(safe) == bf16, (bf16, safe)
