"""Several processes, gradient accumulation, mixed precision and exact resume of the constrained state.

Agreement tolerances asserted here were measured on the CPU CI machine type (see the closing note): two
processes vs one, 12 steps: weights within 6e-8, multipliers and buffers identical; gradient accumulation
2 × 16 vs 1 × 32: multipliers and buffers identical, NFT weights within 3e-8, CEAG weights within 1.2e-2.

Exactness is a claim per device, and these tests make it on the CPU on every machine (deterministic kernels:
bit-exact). On CUDA the same comparisons are not exact and not close: atomics (`index_add_`) and cuDNN's
algorithm choice reorder float sums, a near-tie in the logits then flips a prediction in a replay buffer, and
the dual step (dual_lr 0.5, ε = 0 here) amplifies it. Measured on an H200 (commit b459a4a): gradient
accumulation 2 × 16 vs 1 × 32, multipliers 0.11 apart after 32 steps; resumed vs uninterrupted run, weights
0.021 apart after 16 steps. Two processes need two GPUs; with fewer, they run on the CPU (gloo) as on a
machine without any.

On a machine with a GPU the CPU runs compared go to processes that cannot see it. There (H200 machine, commit
5f832df) two CPU processes matched one within 1e-6 and a resumed run matched an uninterrupted one, but gradient
accumulation did not match one big batch (multipliers 0.11 apart): that test is an expected failure on such
machines until its cause is found.
"""

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from interruptions import straight_and_stopped
from safetensors.torch import load_file
from transformers import TrainerCallback

from hf_ceag import CEAGTrainer, DenseReference, ExcessAccuracyGapProblem
from hf_ceag.constraints.step import ConstrainedStep, dual_state_tensors

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import distributed_worker

PROCESSES_ON_CPU = torch.cuda.device_count() < 2


def run(command, cwd, cpu_only=PROCESSES_ON_CPU):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if cpu_only:
        env["CUDA_VISIBLE_DEVICES"] = ""  # e.g. fewer than two GPUs: the processes run on the CPU
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def state(folder, rank=0):
    return load_file(os.path.join(folder, f"rank{rank}.safetensors"))


def run_on_cpu(out, batch: int, grad_accum: int, mitigation: str) -> None:
    """One worker run on the CPU, where the exactness claims are made: in this process on a machine without a
    GPU; on one with a GPU, in a process that cannot see it (in this one, the accelerator state that earlier
    tests set up can keep the run on the GPU: measured on an H200, the multipliers then differ by 0.11)."""
    if not torch.cuda.is_available():
        distributed_worker.main(str(out), batch, grad_accum, mitigation, use_cpu=True)
        return
    worker = str(ROOT / "tests" / "distributed_worker.py")
    run([sys.executable, worker, str(out), str(batch), str(grad_accum), mitigation], ROOT, cpu_only=True)


@pytest.fixture(scope="module")
def one_process_ceag(tmp_path_factory):
    """One process on the default device (a GPU where there is one)."""
    out = tmp_path_factory.mktemp("one")
    distributed_worker.main(str(out), 32, 1, "ceag")
    return state(out)


@pytest.fixture(scope="module")
def one_process_cpu(tmp_path_factory, one_process_ceag):
    """One process on the CPU, where the exactness claims are made."""
    if not torch.cuda.is_available():
        return one_process_ceag
    out = tmp_path_factory.mktemp("one-cpu")
    run_on_cpu(out, 32, 1, "ceag")
    return state(out)


def test_two_processes_hold_identical_state_and_match_one_process(tmp_path, one_process_cpu):
    out = tmp_path / "two"
    worker = str(ROOT / "tests" / "distributed_worker.py")
    printed = run(["torchrun", "--standalone", "--nproc_per_node", "2", worker, str(out), "16", "1", "ceag"], ROOT)
    assert "world_size=2" in printed
    rank0, rank1 = state(out, 0), state(out, 1)
    for key in ("multiplier", "buffer", "weights"):
        assert torch.equal(rank0[key], rank1[key]), key  # bit-identical across ranks
    assert rank0["multiplier"].abs().sum() > 0
    if not PROCESSES_ON_CPU:
        return  # two GPUs against one CPU process: not comparable (see the module's docstring)
    torch.testing.assert_close(rank0["multiplier"], one_process_cpu["multiplier"], rtol=0, atol=1e-6)
    torch.testing.assert_close(rank0["buffer"], one_process_cpu["buffer"], rtol=0, atol=0)
    torch.testing.assert_close(rank0["weights"], one_process_cpu["weights"], rtol=0, atol=1e-6)
    torch.testing.assert_close(rank0["reference_accuracy"], one_process_cpu["reference_accuracy"])


LAUNCHERS = {
    "torchrun": ["torchrun", "--standalone", "--nproc_per_node", "2"],
    "accelerate": ["accelerate", "launch", "--multi_gpu", "--num_processes", "2"],
}


@pytest.mark.parametrize("launcher", LAUNCHERS.values(), ids=LAUNCHERS.keys())
def test_readme_launchers_run_the_script_on_two_cpu_processes(tmp_path, launcher):
    args = [
        "scripts/run_ceag.py",
        "--output_dir",
        str(tmp_path / "run"),
        "--dense_epochs",
        "1",
        "--allow_weak_dense_model",
        "true",
    ]
    args += ["--num_train_epochs", "2", "--pruning_end_epoch", "1", "--methods", "ceag", "--disable_tqdm", "true"]
    args += ["--digits_variant", "imbalanced"]  # the small digits: this checks the launchers, not the recipe
    printed = run([*launcher, *args], ROOT)
    assert "on 2 process(es)" in printed
    assert (tmp_path / "run" / "ceag" / "report.json").exists()


@pytest.mark.xfail(
    torch.cuda.is_available(),
    reason="on the H200 machine's host CPU (torch 2.11) both CPU runs, each in its own process with one thread, "
    "still ended 0.11 apart in the multipliers; two CPU processes against one matched within 1e-6 there. "
    "Bit-exactness is claimed on the CI machine type only (cause on that host not found)",
    strict=False,
)
def test_gradient_accumulation_matches_one_big_batch(tmp_path, one_process_cpu):
    run_on_cpu(tmp_path / "ga", 16, 2, "ceag")
    accumulated = state(tmp_path / "ga")
    torch.testing.assert_close(accumulated["multiplier"], one_process_cpu["multiplier"], rtol=0, atol=0)
    torch.testing.assert_close(accumulated["buffer"], one_process_cpu["buffer"], rtol=0, atol=0)
    # the first micro-batch's primal gradient uses λ before the step's single dual update
    torch.testing.assert_close(accumulated["weights"], one_process_cpu["weights"], rtol=0, atol=2e-2)
    run_on_cpu(tmp_path / "nft1", 32, 1, "none")
    run_on_cpu(tmp_path / "nft2", 16, 2, "none")
    torch.testing.assert_close(
        state(tmp_path / "nft2")["weights"], state(tmp_path / "nft1")["weights"], rtol=0, atol=1e-6
    )


def test_bf16_runs_with_fp32_constraint_state(tmp_path, one_process_ceag):
    distributed_worker.main(str(tmp_path / "bf16"), 32, 1, "ceag", "bf16")
    bf16 = state(tmp_path / "bf16")
    assert bf16["multiplier"].dtype == torch.float32
    assert not torch.equal(bf16["weights"], one_process_ceag["weights"])  # autocast really ran
    torch.testing.assert_close(bf16["weights"], one_process_ceag["weights"], rtol=0, atol=1e-2)


def test_one_dual_step_per_optimizer_step_and_none_when_the_step_is_skipped(
    tiny_model, digits, make_config, monkeypatch
):
    config = make_config(mitigation="ceag", dual_lr=0.5, tolerance=0.0, gradient_accumulation_steps=2, max_steps=8)
    trainer = CEAGTrainer(tiny_model, config, train_dataset=digits["train"])
    calls = []
    original = ConstrainedStep._dual_step
    monkeypatch.setattr(
        ConstrainedStep, "_dual_step", lambda self, state: (calls.append(1), original(self, state))
    )
    trainer.train()
    constrained_steps = config.max_steps - trainer.schedule.end
    assert len(calls) == constrained_steps > 0
    assert trainer.problem.multipliers_tensor().sum() > 0

    # an fp16 loss scaler that skips every optimizer step: the dual steps are undone too
    skipped = CEAGTrainer(
        copy.deepcopy(tiny_model),
        make_config(mitigation="ceag", dual_lr=0.5, tolerance=0.0),
        train_dataset=digits["train"],
    )
    monkeypatch.setattr(type(skipped.accelerator), "optimizer_step_was_skipped", property(lambda self: True))
    skipped.train()
    assert skipped.problem.multipliers_tensor().abs().sum() == 0


class SkipEveryOther(TrainerCallback):
    """An fp16 loss scaler that skips every other optimizer step; checks at each step end that a skipped step
    left λ and the dual optimizer's state as they were before it, and counts the steps that moved them."""

    def __init__(self, trainer):
        self.trainer, self.skipped, self.before, self.moved, self.undone = trainer, False, None, 0, 0

    def snapshot(self):
        step = self.trainer.constrained_step
        return [step.problem.multipliers_tensor()] + [t.clone() for t in dual_state_tensors(step.dual_optimizer)]

    def on_step_begin(self, args, state, control, **kwargs):
        self.skipped = state.global_step % 2 == 1
        self.before = self.snapshot() if self.trainer.constrained_step is not None else None

    def on_step_end(self, args, state, control, **kwargs):
        now = self.snapshot()
        same = all(torch.equal(a, b) for a, b in zip(self.before, now))
        if self.skipped:
            assert same, state.global_step
            self.undone += 1
        else:
            self.moved += not same


def test_a_skipped_step_leaves_the_multipliers_and_nupi_state_as_before(
    tiny_model, digits, make_config, monkeypatch
):
    config = make_config(
        mitigation="ceag", dual_lr=0.5, tolerance=0.0, pruning_end_epoch=0.0, dual_optimizer="nupi", nupi_kp=2.0
    )
    trainer = CEAGTrainer(tiny_model, config, train_dataset=digits["train"])
    skips = SkipEveryOther(trainer)
    trainer.add_callback(skips)
    monkeypatch.setattr(
        type(trainer.accelerator), "optimizer_step_was_skipped", property(lambda self: skips.skipped)
    )
    trainer.train()
    assert skips.undone == config.max_steps // 2 and skips.moved >= 3
    assert dual_state_tensors(trainer.dual_optimizer)[0].abs().sum() > 0


def dual_state(trainer):
    optimizer = trainer.dual_optimizer
    return [dict(optimizer.state[p]) for group in optimizer.param_groups for p in group["params"]]


@pytest.mark.parametrize("dual", [{}, {"dual_optimizer": "nupi", "nupi_kp": 2.0}], ids=["sgd", "nupi"])
def test_resume_continues_exactly_and_refuses_a_checkpoint_without_constrained_state(
    tmp_path, tiny_model, digits, make_config, dual
):
    dense = copy.deepcopy(tiny_model)
    common = {
        "mitigation": "ceag", "dual_lr": 0.5, "tolerance": 0.0, "max_steps": 16, "pruning_end_epoch": 0.2,
        "use_cpu": True, **dual,
    }  # fmt: skip
    folder = str(tmp_path / "resumable")
    straight, first = straight_and_stopped(dense, make_config, digits["train"], folder, 10, 10, **common)
    assert first.state.global_step == 10 and first.problem.multipliers_tensor().sum() > 0
    checkpoint = os.path.join(folder, "checkpoint-10")
    assert os.path.isfile(os.path.join(checkpoint, "ceag_state.safetensors"))
    assert "multiplier" not in " ".join(load_file(os.path.join(checkpoint, "model.safetensors")))

    broken = str(tmp_path / "broken-checkpoint")
    shutil.copytree(checkpoint, broken)
    os.remove(os.path.join(broken, "ceag_state.safetensors"))

    resumed_model = copy.deepcopy(dense)
    resumed = CEAGTrainer(resumed_model, make_config(output_dir=folder, **common), train_dataset=digits["train"])
    resumed.train(resume_from_checkpoint=True)

    for (name, a), b in zip(straight.model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(a, b), name
    for name, mask in straight.pruner.masks.items():
        assert torch.equal(mask, resumed.pruner.masks[name]), name
    assert torch.equal(straight.problem.multipliers_tensor(), resumed.problem.multipliers_tensor())
    assert torch.equal(straight.problem.buffer.values, resumed.problem.buffer.values)
    straight_state, resumed_state = dual_state(straight), dual_state(resumed)
    assert [sorted(a) for a in straight_state] == [sorted(b) for b in resumed_state]
    for a, b in zip(straight_state, resumed_state):
        assert all(torch.equal(a[k], b[k]) for k in a)
    if dual:
        assert straight_state[0]["xi"].abs().sum() > 0
        assert "dual_optimizer.state.0.xi" in load_file(os.path.join(checkpoint, "ceag_state.safetensors"))
        sgd = {k: v for k, v in common.items() if not k.startswith(("dual_optimizer", "nupi"))}
        other = CEAGTrainer(
            copy.deepcopy(dense), make_config(output_dir=folder, **sgd), train_dataset=digits["train"]
        )
        with pytest.raises(ValueError, match="dual_optimizer='nupi'; this run has dual_optimizer='sgd'"):
            other.train(resume_from_checkpoint=checkpoint)

    refused = CEAGTrainer(
        copy.deepcopy(dense), make_config(output_dir=folder, **common), train_dataset=digits["train"]
    )
    with pytest.raises(ValueError, match="has no constrained state .* restart the multipliers"):
        refused.train(resume_from_checkpoint=broken)


@pytest.mark.parametrize("buffer_size", [0, 3], ids=["batch_estimates", "replay_buffers"])
def test_the_fixed_shape_gather_leaves_the_padding_out_of_the_estimates(buffer_size):
    """`CEAGTrainer._gather` on two processes holding 3 and 5 rows (batch size 6): each pads to 6 rows with
    group id `num_groups`, and the estimates built from the gathered 12 rows equal those from the 8 real rows
    observed directly, in rank order. More rows than the batch size is refused before anything is gathered."""
    reference = DenseReference(["a", "b", "c"], [10, 10, 10], [0.9, 0.8, 0.7], [0.3, 0.3, 0.3])

    def problem():
        return ExcessAccuracyGapProblem(reference, buffer_size, tolerance=0.0)

    generator = torch.Generator().manual_seed(0)
    ranks = [  # (group ids, correct, losses) of each process
        (torch.randint(0, 3, (n,), generator=generator), torch.rand(n, generator=generator) < 0.5, torch.rand(n))
        for n in (3, 5)
    ]
    sent = []

    def gather(tensor):  # rank 0's view of an all-gather: its rows, then rank 1's, padded the same way
        sent.append(tuple(tensor.shape))
        padded = torch.zeros(6, 3)
        padded[:, 0] = 3  # the padding's group id
        padded[:5] = torch.stack([column.float() for column in ranks[1]], dim=1)
        return torch.cat([tensor, padded])

    gathered_problem, direct = problem(), problem()
    fake = SimpleNamespace(
        accelerator=SimpleNamespace(num_processes=2, gather=gather),
        args=SimpleNamespace(per_device_train_batch_size=6),
        problem=gathered_problem,
    )
    for _ in range(3):  # several calls: the buffers wrap
        gathered_problem.observe(*CEAGTrainer._gather(fake, *ranks[0]))
        direct.observe(*(torch.cat([ranks[0][i], ranks[1][i]]) for i in range(3)))
        assert sent[-1] == (6, 3)
        for name in ("group_estimate", "ready", "estimate_weights"):
            assert torch.equal(getattr(gathered_problem, name), getattr(direct, name)), name
        assert torch.equal(gathered_problem.estimated_gaps(), direct.estimated_gaps())
    assert gathered_problem.ready.any()
    fake.args.per_device_train_batch_size = 2
    with pytest.raises(ValueError, match="3 rows .* per_device_train_batch_size=2"):
        CEAGTrainer._gather(fake, *ranks[0])
    assert len(sent) == 3  # refused before the gather
