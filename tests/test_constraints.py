import math
import types

import pytest
import torch

from hf_ceag import DenseReference, EqualizedLossProblem, ExcessAccuracyGapProblem
from hf_ceag.constraints.step import ConstrainedStep, build_dual_optimizer, plain_ascent_lr


def reference(num_groups=3):
    return DenseReference(
        group_names=[f"g{i}" for i in range(num_groups)],
        group_counts=[50] * num_groups,
        group_accuracy=[0.9] * num_groups,
        group_loss=[0.3] * num_groups,
    )


def dual_step(problem, state, lr):
    optimizer = torch.optim.SGD(problem.dual_parameters(), lr=lr, maximize=True)
    optimizer.zero_grad(set_to_none=True)
    dual = state.compute_dual_lagrangian()
    if dual.lagrangian is not None:
        dual.lagrangian.backward()
        optimizer.step()
        problem.multiplier.post_step_()


def test_multipliers_rise_for_violated_groups_stay_nonnegative_and_wait_for_full_buffers():
    problem = ExcessAccuracyGapProblem(reference(), buffer_size=4, tolerance=0.05)
    # group 0: all wrong (violated); group 1: all right (satisfied); group 2: one sample a step (not full)
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2])
    correct = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 0]).float()
    for step in range(3):
        problem.observe(ids, correct, torch.zeros(9))
        losses = torch.rand(9, requires_grad=True)
        dual_step(problem, problem.compute_cmp_state(losses, ids), lr=0.5)
        lam = problem.multipliers_tensor()
        psi = problem.estimated_gaps()
        assert problem.ready.tolist() == [True, True, False]
        assert lam[0] > 0 and lam[1] == 0 and lam[2] == 0
        assert (lam >= 0).all()
    # by hand: only the full buffers (groups 0 and 1, half of their training rows each) count, in ψ̂ and in
    # the overall accuracy inside it: sparse (0, 1) → overall 1/2; group 2's partial buffer is left out
    assert psi[0].item() == pytest.approx((0.9 - 0.0) - (0.9 - 1 / 2))
    assert psi[2].item() == 0.0
    assert lam[0].item() == pytest.approx(3 * 0.5 * (psi[0].item() - 0.05))


@pytest.mark.parametrize("overall_gradient", [False, True], ids=["default_proxy", "paper_proxy"])
def test_primal_lagrangian_gradient_is_loss_plus_weighted_surrogates(overall_gradient):
    problem = ExcessAccuracyGapProblem(
        reference(), buffer_size=0, tolerance=0.0, overall_gradient=overall_gradient
    )
    with torch.no_grad():
        problem.multiplier.weight.copy_(torch.tensor([0.2, 0.0, 0.7]))
    losses = torch.tensor([0.1, 0.5, 0.9, 1.3], requires_grad=True)
    ids = torch.tensor([0, 0, 2, 1])
    state = problem.compute_cmp_state(losses, ids, update_duals=False)
    state.compute_primal_lagrangian().lagrangian.backward()
    # L = mean; ψ̃_g = L_g − L + const → dL/dl_i = 1/4; dL_0/dl_i = 1/2 for i in {0,1}; dL_2/dl_2 = 1; the
    # default proxy holds L constant inside ψ̃_g, the paper's differentiates it too
    lam0, lam2 = 0.2, 0.7
    overall = (1 - lam0 - lam2) if overall_gradient else 1.0
    expected = torch.full((4,), 0.25) * overall + torch.tensor([lam0 / 2, lam0 / 2, lam2, 0.0])
    torch.testing.assert_close(losses.grad, expected)


@pytest.mark.parametrize("overall_gradient", [False, True], ids=["default_proxy", "paper_proxy"])
def test_primal_step_never_raises_a_groups_loss_with_the_default_proxy(overall_gradient):
    """Once the multipliers sum past 1, the paper's proxy gives the samples of a group with λ_g = 0 a negative
    weight in the primal gradient (the step raises their loss); the default proxy keeps every weight > 0."""
    problem = ExcessAccuracyGapProblem(
        reference(), buffer_size=0, tolerance=0.0, overall_gradient=overall_gradient
    )
    torch.manual_seed(0)
    for _ in range(20):
        lam = torch.rand(3) * 3
        lam[torch.randint(0, 3, ())] = 0.0
        with torch.no_grad():
            problem.multiplier.weight.copy_(lam)
        losses = torch.rand(12, requires_grad=True)
        ids = torch.arange(12) % 3
        problem.compute_cmp_state(
            losses, ids, update_duals=False
        ).compute_primal_lagrangian().lagrangian.backward()
        if overall_gradient and lam.sum() > 1:
            assert (losses.grad[lam.flatten()[ids] == 0] < 0).all()
        if not overall_gradient:
            assert (losses.grad > 0).all()


@pytest.mark.parametrize("kind", ["ceag", "ceag_paper_proxy", "el"])
def test_the_primal_lagrangian_equals_coopers_in_value_and_gradient(kind):
    """`primal_lagrangian` (one weighted sum of the per-sample losses) against Cooper's
    `compute_cmp_state(...).compute_primal_lagrangian()`: a micro-batch slice of a larger step (`step_group_counts`,
    `scale` 2), one group absent from the step, one present in the step but not in this slice, λ of both signs
    for EL."""
    num_groups = 5
    ref = DenseReference(
        group_names=[f"g{i}" for i in range(num_groups)],
        group_counts=[40, 30, 20, 10, 5],
        group_accuracy=[0.9, 0.8, 0.85, 0.7, 0.95],
        group_loss=[0.3, 0.5, 0.2, 0.9, 0.4],
    )
    if kind == "el":
        problem = EqualizedLossProblem(ref, buffer_size=0)
        group_loss, loss = torch.tensor([0.5, 1.0, 2.0, 0.1, 0.0]), torch.tensor(0.7)
        # EL's surrogate has no reference losses
        torch.testing.assert_close(problem.surrogate_violations(group_loss, loss), group_loss - loss)
    else:
        problem = ExcessAccuracyGapProblem(ref, buffer_size=0, tolerance=0.01, overall_gradient=kind != "ceag")
    generator = torch.Generator().manual_seed(3)
    for trial in range(5):
        multipliers = torch.rand(num_groups, generator=generator) * 2
        if kind == "el":
            multipliers -= 1
        with torch.no_grad():
            problem.multiplier.weight.copy_(multipliers)
        ids = torch.tensor([0, 0, 1, 2, 2, 2, 0, 1])[torch.randperm(8, generator=generator)]
        # the step: this slice twice over, and group 3 only in another slice
        step_counts = torch.bincount(ids, minlength=num_groups) * 2 + torch.tensor([0, 1, 0, 3, 0])
        losses = torch.rand(8, generator=generator) * 3
        ours, theirs = losses.clone().requires_grad_(), losses.clone().requires_grad_()
        value = problem.primal_lagrangian(ours, ids, step_counts, scale=2)
        state = problem.compute_cmp_state(theirs, ids, step_counts, scale=2, update_duals=False)
        expected = state.compute_primal_lagrangian().lagrangian
        value.backward()
        expected.backward()
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(ours.grad, ours.grad[0].expand(8))  # the multipliers do weight the samples


def test_equalized_loss_multipliers_take_either_sign():
    problem = EqualizedLossProblem(reference(2), buffer_size=0)
    ids = torch.tensor([0, 0, 1, 1])
    losses = torch.tensor([2.0, 2.0, 0.0, 0.0])
    problem.observe(ids, torch.ones(4), losses)
    dual_step(problem, problem.compute_cmp_state(losses.clone().requires_grad_(), ids), lr=1.0)
    lam = problem.multipliers_tensor()
    assert lam[0] == pytest.approx(1.0) and lam[1] == pytest.approx(-1.0)  # L_g − L = ±1


def test_bad_arguments():
    with pytest.raises(ValueError, match="tolerance"):
        ExcessAccuracyGapProblem(reference(), buffer_size=4, tolerance=float("nan"))
    with pytest.raises(ValueError, match="buffer_size"):
        ExcessAccuracyGapProblem(reference(), buffer_size=-1, tolerance=0.1)


@pytest.mark.parametrize("margin", [0.0, 0.02])
def test_constraint_margin_trains_at_tolerance_minus_margin(margin):
    """With margin δ the problem's violation for an estimate ψ̂ is ψ̂ − (ε − δ) (here ε − δ may be negative),
    and its dual step follows it; the configured tolerance, which the reports judge at, stays ε."""
    args = types.SimpleNamespace(
        mitigation="ceag", buffer_size=2, tolerance=0.01, constraint_margin=margin, device="cpu",
        surrogate_overall_gradient=False, dual_lr=0.5,
    )  # fmt: skip
    step = ConstrainedStep.for_run(args, reference())
    problem = step.problem
    # group 0 at the dense accuracy, group 1 one row in two right, group 2 all right
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    correct = torch.tensor([1, 0, 1, 0, 1, 1]).float()
    step.loss(torch.rand(6), correct, ids, torch.bincount(ids, minlength=3), 1, True, True, lambda *b: b)
    psi = problem.estimated_gaps()
    torch.testing.assert_close(problem.strict_violations(), psi - (0.01 - margin))
    torch.testing.assert_close(problem.multipliers_tensor(), (0.5 * (psi - (0.01 - margin))).clamp(min=0))
    assert problem.tolerance == pytest.approx(0.01 - margin) and args.tolerance == 0.01


def nupi_run(dual_optimizer, steps=8, **gains):
    """`ConstrainedStep` fed a fixed sequence of batches (group 2 only from step 3 on, group 1 mostly right so
    its λ hits the projection), with what each dual step saw: the violations e_t and which groups were ready."""
    problem = ExcessAccuracyGapProblem(reference(), buffer_size=2, tolerance=0.02)
    step = ConstrainedStep(problem, build_dual_optimizer(dual_optimizer, problem.dual_parameters(), 0.5, **gains))
    generator = torch.Generator().manual_seed(0)
    seen, multipliers = [], []
    for t in range(steps):
        ids = torch.tensor([0, 0, 1, 1, 2] if t >= 3 else [0, 0, 1, 1])
        right = torch.tensor([0.3, 0.3, 0.9, 0.9, 0.5])[: len(ids)]
        correct = (torch.rand(len(ids), generator=generator) < right).float()
        losses = torch.rand(len(ids), generator=generator, requires_grad=True)
        counts = torch.bincount(ids, minlength=3)
        step.loss(losses, correct, ids, counts, 1, active=True, update_duals=True, gather=lambda *b: b)
        # the estimates the step observed and stepped on are still there
        seen.append((torch.where(problem.ready, problem.strict_violations(), 0.0), problem.ready.clone()))
        multipliers.append(problem.multipliers_tensor())
    return seen, multipliers, step


@pytest.mark.parametrize("ema_nu", [0.0, 0.3])
def test_nupi_dual_steps_match_a_pi_controller_written_from_the_paper(ema_nu):
    """Sohrabi et al. (ICML 2024), nuPI with ξ_(−1) = 0, per group from the step it is ready, by hand:
    ξ_t = ν ξ_(t−1) + (1 − ν) e_t;  λ_(t+1) = max(0, λ_t + η (κ_i e_t + κ_p (ξ_t − ξ_(t−1))))."""
    lr, kp, ki = 0.5, 3.0, 0.7
    seen, multipliers, step = nupi_run("nupi", kp=kp, ki=ki, ema_nu=ema_nu)
    lam, xi = [0.0] * 3, [0.0] * 3
    for (violations, ready), actual in zip(seen, multipliers):
        for g in range(3):
            if not ready[g]:
                continue
            e = float(violations[g])
            xi_new = ema_nu * xi[g] + (1 - ema_nu) * e
            lam[g] = max(0.0, lam[g] + lr * (ki * e + kp * (xi_new - xi[g])))
            xi[g] = xi_new
        torch.testing.assert_close(actual, torch.tensor(lam), rtol=1e-5, atol=1e-6)
    assert seen[3][1].tolist() == [True, True, False] and all(seen[-1][1])  # group 2 joins late
    assert min(float(v.min()) for v, _ in seen) < 0 < max(float(v.max()) for v, _ in seen)
    assert any(m[1] == 0 for m in multipliers[2:]) and multipliers[-1][0] > 0  # projected, and risen
    torch.testing.assert_close(step.dual_optimizer.state[step.problem.multiplier.weight]["xi"], torch.tensor(xi))


def test_nupi_without_proportional_gain_is_plain_sgd_bit_for_bit():
    _, sgd, _ = nupi_run("sgd")
    _, nupi, _ = nupi_run("nupi", kp=0.0, ki=1.0)
    assert all(torch.equal(a, b) for a, b in zip(sgd, nupi))
    assert sgd[-1].sum() > 0


def test_undo_of_a_skipped_step_restores_multipliers_and_nupi_state():
    _, _, step = nupi_run("nupi", steps=5, kp=2.0)
    problem, optimizer = step.problem, step.dual_optimizer
    xi = optimizer.state[problem.multiplier.weight]["xi"]
    before = problem.multipliers_tensor(), xi.clone(), problem.dual_step_count.clone()
    ids, losses = torch.tensor([0, 1, 2]), torch.rand(3, requires_grad=True)
    correct = torch.tensor([0.0, 1.0, 1.0])  # all estimates move, not by one common shift (ψ would not)
    step.loss(losses, correct, ids, torch.ones(3), 1, active=True, update_duals=True, gather=lambda *b: b)
    assert not torch.equal(xi, before[1]) and not torch.equal(problem.multipliers_tensor(), before[0])
    step.undo_if_skipped(True)
    assert torch.equal(problem.multipliers_tensor(), before[0]) and torch.equal(xi, before[1])
    assert problem.dual_step_count == before[2]


@pytest.mark.parametrize("problem_kind", ["ceag", "el"])
@pytest.mark.parametrize("dual_optimizer", ["sgd", "nupi"])
def test_the_dual_step_equals_coopers_dual_lagrangian_backward(problem_kind, dual_optimizer):
    """`ConstrainedStep` sets ∂(λᵀg)/∂λ = g by hand; Cooper's dual Lagrangian, differentiated by autograd and
    stepped by a copy of the same optimizer, gives the same multipliers (and nuPI state), step after step."""

    def make():
        if problem_kind == "ceag":
            problem = ExcessAccuracyGapProblem(reference(), buffer_size=2, tolerance=0.02)
        else:
            problem = EqualizedLossProblem(reference(), buffer_size=2)
        optimizer = build_dual_optimizer(dual_optimizer, problem.dual_parameters(), 0.5, kp=2.0, ki=0.7)
        return problem, optimizer

    problem, optimizer = make()
    step = ConstrainedStep(problem, optimizer)
    twin, twin_optimizer = make()  # stepped through Cooper's dual Lagrangian
    generator = torch.Generator().manual_seed(1)
    moved = 0
    for t in range(8):
        ids = torch.tensor([0, 0, 1, 1, 2] if t >= 3 else [0, 0, 1, 1])
        correct = (torch.rand(len(ids), generator=generator) < 0.6).float()
        losses = torch.rand(len(ids), generator=generator)
        counts = torch.bincount(ids, minlength=3)
        value = step.loss(losses.clone().requires_grad_(), correct, ids, counts, 1, True, True, lambda *b: b)

        twin.observe(ids, correct, losses)
        state = twin.compute_cmp_state(losses.clone().requires_grad_(), ids, counts)
        before = twin.multiplier.weight.detach().clone()
        xi_before = [v.clone() for v in twin_optimizer.state[twin.multiplier.weight].values()]
        twin_optimizer.zero_grad(set_to_none=True)
        state.compute_dual_lagrangian().lagrangian.backward()
        expected_grad = state.observed_constraints[twin.group_constraint].strict_violation
        assert torch.equal(twin.multiplier.weight.grad, expected_grad)  # what the step sets by hand
        twin_optimizer.step()
        if xi_before:  # nuPI: rows of groups not ready put back, as the step does
            with torch.no_grad():
                weight = twin.multiplier.weight
                weight.copy_(torch.where(twin.ready, weight, before))
                for now, saved in zip(twin_optimizer.state[weight].values(), xi_before):
                    now.copy_(torch.where(twin.ready, now, saved))
        twin.multiplier.post_step_()
        assert torch.equal(problem.multipliers_tensor(), twin.multipliers_tensor()), t
        # the step's loss: Cooper's primal Lagrangian with the multipliers after the dual step
        torch.testing.assert_close(value, state.compute_primal_lagrangian().lagrangian, rtol=1e-6, atol=1e-6)
        moved += int(not torch.equal(before, twin.multiplier.weight.detach()))
    assert moved >= 4 and problem.multipliers_tensor().abs().sum() > 0


def random_steps(step, steps, seed=0, before_step=None, device="cpu"):
    """`steps` dual steps of `step` on random batches of 3 groups (group 2 from step 3 on), calling
    `before_step(t)` first if given. The multipliers after each step."""
    generator, multipliers = torch.Generator().manual_seed(seed), []
    for t in range(steps):
        if before_step is not None:
            before_step(step, t)
        ids = torch.tensor([0, 0, 1, 1, 2] if t >= 3 else [0, 0, 1, 1])
        correct = (torch.rand(len(ids), generator=generator) < 0.6).float()
        losses = torch.rand(len(ids), generator=generator)
        counts = torch.bincount(ids, minlength=3)
        ids, correct, losses, counts = (x.to(device) for x in (ids, correct, losses, counts))
        losses.requires_grad_()
        step.loss(losses, correct, ids, counts, 1, active=True, update_duals=True, gather=lambda *b: b)
        step.undo_if_skipped(False)
        multipliers.append(step.problem.multipliers_tensor())
    return multipliers


class SteppedSGD(torch.optim.SGD):
    """Plain SGD that `ConstrainedStep` does not recognise: its own `step()` runs."""


def resume_then_reschedule(step, t):
    # step 4: a resume, loading a checkpoint's dual optimizer (its rate 0.3); step 7: a scheduler sets 0.25
    optimizer = step.dual_optimizer
    if t == 4:
        saved = optimizer.state_dict()
        saved["param_groups"][0]["lr"] = 0.3
        optimizer.load_state_dict(saved)
    if t == 7:
        optimizer.param_groups[0]["lr"] = 0.25


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)  # on CUDA, SGD takes its foreach path
@pytest.mark.parametrize("problem_kind", ["ceag", "el"])
def test_the_plain_sgd_ascent_equals_the_optimizers_step_bit_for_bit(problem_kind, device):
    """The dual step applies plain SGD's update itself; `torch.optim.SGD.step()` gives the same multipliers, bit
    for bit, also after a resume loads another learning rate and after a scheduler changes it."""

    def make(optimizer_class):
        if problem_kind == "ceag":
            problem = ExcessAccuracyGapProblem(reference(), buffer_size=2, tolerance=0.02, device=device)
        else:
            problem = EqualizedLossProblem(reference(), buffer_size=2, device=device)
        return ConstrainedStep(problem, optimizer_class(problem.dual_parameters(), lr=0.5, maximize=True))

    direct, stepped = make(torch.optim.SGD), make(SteppedSGD)
    assert plain_ascent_lr(direct.dual_optimizer) == 0.5 and plain_ascent_lr(stepped.dual_optimizer) is None
    ours = random_steps(direct, 10, before_step=resume_then_reschedule, device=device)
    theirs = random_steps(stepped, 10, before_step=resume_then_reschedule, device=device)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    lam = [m.tolist() for m in ours]
    assert len({tuple(m) for m in lam[4:]}) > 3 and ours[-1].abs().sum() > 0  # still moving after the resume
    assert stepped.problem.multiplier.weight.grad is not None and direct.problem.multiplier.weight.grad is None
    # the rates did reach the step: with the resume's rate ignored (0.5 kept), the multipliers differ
    ignored = make(torch.optim.SGD)
    unchanged = random_steps(ignored, 10, device=device)
    assert torch.equal(unchanged[3], ours[3]) and not torch.equal(unchanged[-1], ours[-1])


def test_only_plain_sgd_takes_the_shortcut():
    weight = [torch.nn.Parameter(torch.zeros(3))]
    assert plain_ascent_lr(torch.optim.SGD(weight, lr=0.1, maximize=True)) == pytest.approx(0.1)
    for other in (
        torch.optim.SGD(weight, lr=0.1),  # descent
        torch.optim.SGD(weight, lr=0.1, maximize=True, momentum=0.9),
        torch.optim.SGD(weight, lr=0.1, maximize=True, weight_decay=0.1),
        torch.optim.SGD(weight, lr=torch.tensor(0.1), maximize=True),  # reading it could synchronise a GPU
        SteppedSGD(weight, lr=0.1, maximize=True),
        build_dual_optimizer("nupi", weight, 0.1),
        None,
    ):
        assert plain_ascent_lr(other) is None


def test_undo_of_a_skipped_step_restores_the_multipliers_of_the_plain_sgd_ascent():
    problem = ExcessAccuracyGapProblem(reference(), buffer_size=2, tolerance=0.02)
    step = ConstrainedStep(problem, build_dual_optimizer("sgd", problem.dual_parameters(), 0.5))
    random_steps(step, 5)
    before, count = problem.multipliers_tensor(), problem.dual_steps
    ids, correct = torch.tensor([0, 1, 2]), torch.tensor([0.0, 1.0, 1.0])
    step.loss(torch.rand(3, requires_grad=True), correct, ids, torch.ones(3), 1, True, True, lambda *b: b)
    assert not torch.equal(problem.multipliers_tensor(), before) and problem.dual_steps == count + 1
    step.undo_if_skipped(True)
    assert torch.equal(problem.multipliers_tensor(), before) and problem.dual_steps == count
    step.undo_if_skipped(True)  # no dual step since: nothing to undo
    assert torch.equal(problem.multipliers_tensor(), before) and problem.dual_steps == count


class OneProcess:
    num_processes = 1


def test_step_metrics_against_a_plain_loop():
    """`ce_loss` and `max_excess_gap_window` summed over the micro-batches since the last log, by hand; the
    dual state (largest estimated gap over ready groups, λ mean and max, full buffers) as the log finds it."""
    problem = ExcessAccuracyGapProblem(reference(), buffer_size=3, tolerance=0.02)
    step = ConstrainedStep(problem, build_dual_optimizer("sgd", problem.dual_parameters(), 0.5))
    generator = torch.Generator().manual_seed(3)
    batches = []
    for t in range(5):
        ids = torch.tensor([0, 0, 1, 1, 1] if t < 4 else [0, 1, 2])  # group 2 seen once: its buffer not full
        correct = (torch.rand(len(ids), generator=generator) < 0.7).float()
        losses = torch.rand(len(ids), generator=generator, requires_grad=True)
        step.loss(losses, correct, ids, torch.bincount(ids, minlength=3), 1, True, True, lambda *b: b)
        batches.append((ids.tolist(), correct.tolist(), losses.tolist()))
    logs = step.metrics.flush(OneProcess())

    ce = sum(sum(losses) / len(losses) for _, _, losses in batches) / len(batches)
    seen, right = [0] * 3, [0] * 3
    for ids, correct, _ in batches:
        for g, c in zip(ids, correct):
            seen[g], right[g] = seen[g] + 1, right[g] + c
    dense, share = [0.9] * 3, [1 / 3] * 3
    lost = [dense[g] - right[g] / seen[g] for g in range(3)]
    overall = sum(share[g] * lost[g] for g in range(3)) / sum(share)
    lam = problem.multipliers_tensor().tolist()
    assert problem.ready.tolist() == [True, True, False]
    # the estimates by hand: the last 3 correctness values of groups 0 and 1 (group 2 has seen one: not ready)
    last = {g: [c for ids, correct, _ in batches for i, c in zip(ids, correct) if i == g][-3:] for g in (0, 1)}
    lost_estimate = {g: 0.9 - sum(values) / 3 for g, values in last.items()}
    overall_estimate = sum(lost_estimate.values()) / 2  # equal training shares
    assert logs == pytest.approx({
        "ce_loss": ce,
        "max_excess_gap_window": max(lost[g] - overall for g in range(3)),
        "max_excess_gap_estimate": max(value - overall_estimate for value in lost_estimate.values()),
        "multiplier_mean": sum(lam) / 3,
        "multiplier_max": max(lam),
        "full_buffers": 2,
    })  # fmt: skip
    # the sums start again (no micro-batch since: no ce_loss, no window); the dual state is read again
    state = {
        key: logs[key] for key in ("max_excess_gap_estimate", "multiplier_mean", "multiplier_max", "full_buffers")
    }
    assert step.metrics.flush(OneProcess()) == state
    # NFT (no dual optimizer) logs the sums only; a NaN cross-entropy stays NaN, for NonFiniteGuard
    nft = ConstrainedStep(ExcessAccuracyGapProblem(reference(), buffer_size=0, tolerance=0.02), None)
    nft.metrics.record(torch.tensor([0.5, float("nan")]), torch.tensor([1.0, 0.0]), torch.tensor([0, 1]))
    logs = nft.metrics.flush(OneProcess())
    assert set(logs) == {"ce_loss", "max_excess_gap_window"} and math.isnan(logs["ce_loss"])
