"""Distillation: the chunked KD math, and DistillationCallback healing a pruned model inside the run."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from conftest import LAYERS, TinyLM, fast_trainer, loader, tiny_model
from lightning.pytorch.callbacks import ModelCheckpoint

from lp_callbacks import BlockInfluenceMonitor, DistillationCallback, LayerPruneCallback, get_decoder_layers
from lp_callbacks.distillation import aligned_hidden_pairs, hidden_alignment_loss, kd_loss, next_token_mask
from lp_callbacks.reference import frozen_copy


def reference_kd(student, teacher, mask, temperature=1.0):
    """Unchunked textbook KL(teacher || student) * T^2, mean over the masked positions, in float64."""
    p = torch.softmax(teacher.double() / temperature, -1)
    log_ratio = torch.log_softmax(teacher.double() / temperature, -1) - torch.log_softmax(student.double() / temperature, -1)
    return (p * log_ratio).sum(-1)[mask].mean() * temperature**2


# ============================================================================================ the math
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1024])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_kd_equals_unchunked_reference_values_and_gradients(chunk_size, temperature):
    student = torch.randn(3, 9, 50, requires_grad=True)
    teacher = torch.randn(3, 9, 50)
    attention_mask = torch.ones(3, 9, dtype=torch.long)
    attention_mask[1, 6:] = 0
    mask = next_token_mask(attention_mask=attention_mask)
    loss = kd_loss(student, teacher, mask, temperature=temperature, chunk_size=chunk_size)
    (grad,) = torch.autograd.grad(loss, student)
    expected = reference_kd(student, teacher, mask, temperature)
    (expected_grad,) = torch.autograd.grad(expected, student)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad.float(), rtol=1e-4, atol=1e-7)


def test_kd_is_computed_in_fp32_from_bf16_logits():
    student, teacher = torch.randn(2, 5, 40), torch.randn(2, 5, 40)
    mask = torch.ones(2, 5, dtype=torch.bool)
    loss = kd_loss(student.bfloat16(), teacher.bfloat16(), mask, chunk_size=2)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), reference_kd(student.bfloat16().float(), teacher.bfloat16().float(), mask))


def test_identical_logits_give_zero_kd_and_zero_gradient():
    logits = torch.randn(2, 6, 30, requires_grad=True)
    loss = kd_loss(logits, logits.detach().clone(), torch.ones(2, 6, dtype=torch.bool))
    loss.backward()
    assert float(loss) == 0.0
    assert logits.grad.abs().max() < 1e-7


def test_padding_positions_do_not_count():
    student, teacher = torch.randn(2, 8, 20), torch.randn(2, 8, 20)
    labels = torch.randint(0, 20, (2, 8))
    labels[0, 5:] = -100
    mask = next_token_mask(labels=labels)
    assert mask[0].tolist() == [True] * 4 + [False] * 4 and mask[1].tolist() == [True] * 7 + [False]
    changed = student.clone()
    changed[~mask] = 1e4  # garbage where nothing counts
    assert float(kd_loss(changed, teacher, mask)) == pytest.approx(float(kd_loss(student, teacher, mask)), rel=1e-6)


def test_top_k_over_the_whole_vocabulary_is_the_full_kd_and_a_small_k_differs():
    student, teacher = torch.randn(2, 5, 25), torch.randn(2, 5, 25)
    mask = torch.ones(2, 5, dtype=torch.bool)
    full = kd_loss(student, teacher, mask)
    torch.testing.assert_close(kd_loss(student, teacher, mask, top_k=25), full)
    assert abs(float(kd_loss(student, teacher, mask, top_k=3)) - float(full)) > 1e-3


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_top_k_gradient_equals_autograd_through_the_sparse_reference(temperature):
    """The gradient is derived by hand in the forward pass: under top_k it must still be the true one."""
    student = torch.randn(2, 6, 30, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 6, 30, dtype=torch.float64)
    mask = torch.rand(2, 6, generator=torch.Generator().manual_seed(0)) > 0.3
    (grad,) = torch.autograd.grad(kd_loss(student, teacher, mask, temperature=temperature, top_k=4, chunk_size=3), student)
    top, tokens = (teacher / temperature).topk(4, dim=-1)
    log_p = torch.log_softmax(top, -1)
    log_q = torch.log_softmax(student / temperature, -1).gather(-1, tokens)
    expected = (log_p.exp() * (log_p - log_q)).sum(-1)[mask].mean() * temperature**2
    (expected_grad,) = torch.autograd.grad(expected, student)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-9)


def test_bf16_logits_get_a_bf16_gradient_close_to_the_fp32_one():
    student = torch.randn(2, 5, 40)
    teacher = torch.randn(2, 5, 40)
    mask = torch.ones(2, 5, dtype=torch.bool)
    low = student.bfloat16().requires_grad_(True)
    (grad,) = torch.autograd.grad(kd_loss(low, teacher.bfloat16(), mask), low)
    reference = low.detach().float().requires_grad_(True)
    (expected,) = torch.autograd.grad(reference_kd(reference, teacher.bfloat16().float(), mask), reference)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad.float(), expected, rtol=2e-2, atol=1e-4)


def test_hidden_pairs_follow_original_indices_and_the_normed_last_state():
    assert aligned_hidden_pairs([0, 1, 2, 3], 4) == [(1, 1), (2, 2), (3, 3), (4, 4)]
    assert aligned_hidden_pairs([0, 2, 5], 6) == [(1, 1), (2, 3), (3, 6)]
    states = [torch.randn(2, 4, 8) for _ in range(3)]
    mask = torch.ones(2, 4, dtype=torch.bool)
    assert float(hidden_alignment_loss(states, [s * 3.0 for s in states], [(1, 1), (2, 2)], mask)) == pytest.approx(0.0, abs=1e-6)
    assert float(hidden_alignment_loss(states, states[::-1], [(0, 0)], mask)) > 0.1


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: kd_loss(torch.randn(1, 3, 5), torch.randn(1, 3, 6), torch.ones(1, 3, dtype=torch.bool)), "same shape"),
        (lambda: kd_loss(torch.randn(1, 3, 5), torch.randn(1, 3, 5), torch.ones(1, 2, dtype=torch.bool)), "`mask`"),
        (lambda: kd_loss(torch.randn(1, 3, 5), torch.randn(1, 3, 5), torch.ones(1, 3, dtype=torch.bool), temperature=0), "`temperature`"),
        (lambda: kd_loss(torch.randn(1, 3, 5), torch.randn(1, 3, 5), torch.ones(1, 3, dtype=torch.bool), top_k=0), "`top_k`"),
        (lambda: next_token_mask(), "labels"),
    ],
)
def test_bad_math_input_is_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ============================================================================================ the callback
class GradProbe(pl.Callback):
    """The gradients of the first optimizer step and the logged train losses."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}
        self.losses: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.grads:
            self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def test_identical_teacher_gives_kd_zero_and_scales_the_lm_gradients_only(tmp_path):
    plain, distilled = GradProbe(), GradProbe()
    fast_trainer(tmp_path, callbacks=[plain], max_steps=1).fit(TinyLM(), loader(length=4))
    distil = DistillationCallback(teacher="initial", alpha=0.3)
    fast_trainer(tmp_path, callbacks=[distil, distilled], max_steps=1).fit(TinyLM(), loader(length=4))
    assert distil.last["kd_loss"] == 0.0
    assert distil.last["lm_loss"] == pytest.approx(plain.losses[0], rel=1e-6)
    assert set(distilled.grads) == set(plain.grads)
    for name, grad in plain.grads.items():
        torch.testing.assert_close(distilled.grads[name], 0.7 * grad, rtol=1e-5, atol=1e-7, msg=name)


def test_before_first_prune_teacher_is_the_whole_model_at_the_removal(tmp_path):
    distil, probe = DistillationCallback(teacher="before_first_prune", alpha=0.5), GradProbe()
    plain = GradProbe()
    fast_trainer(tmp_path, callbacks=[LayerPruneCallback(num_layers=2, at_steps=[3]), plain], max_steps=6).fit(TinyLM(), loader())
    module = TinyLM()
    snapshot = {}

    class AtRemoval(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3 and not snapshot:
                snapshot.update({k: v.clone() for k, v in pl_module.model.state_dict().items()})

    prune = LayerPruneCallback(num_layers=2, at_steps=[3])
    fast_trainer(tmp_path, callbacks=[AtRemoval(), distil, prune, probe], max_steps=6).fit(module, loader())
    assert distil.teacher_taken_at == 3 and len(get_decoder_layers(distil.teacher)) == LAYERS
    assert len(get_decoder_layers(module)) == LAYERS - 2
    teacher_state = distil.teacher.state_dict()
    assert all(torch.equal(teacher_state[k], v) for k, v in snapshot.items())  # the model just before the removal
    assert probe.losses[:3] == pytest.approx(plain.losses[:3], rel=1e-6)  # no teacher yet: the LM loss unchanged
    assert distil.last["kd_loss"] > 0  # after the removal the student differs from its teacher


def test_teacher_never_enters_the_optimizer_the_module_or_the_export(tmp_path):
    distil = DistillationCallback(teacher="initial")
    prune = LayerPruneCallback(num_layers=2, at_steps=[2], export_dir=tmp_path / "export")
    module = TinyLM()
    trainer = fast_trainer(tmp_path, callbacks=[distil, prune], max_steps=4)
    trainer.fit(module, loader())
    teacher_params = {id(p) for p in distil.teacher.parameters()}
    optimizer = trainer.optimizers[0]
    assert not teacher_params & {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not teacher_params & set(map(id, optimizer.state))
    assert not teacher_params & {id(p) for p in module.parameters()}
    assert all(not p.requires_grad for p in distil.teacher.parameters()) and not distil.teacher.training
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert set(exported.state_dict()) == set(module.model.state_dict())
    assert len(get_decoder_layers(exported)) == LAYERS - 2


def test_teacher_forwards_are_invisible_to_the_block_influence_monitor(tmp_path):
    counts = []
    for callbacks in ([], [DistillationCallback(teacher="initial")]):
        monitor = BlockInfluenceMonitor(every_n_steps=1)
        fast_trainer(tmp_path, callbacks=[monitor, *callbacks], max_steps=3).fit(TinyLM(), loader())
        counts.append((monitor.tokens_seen, monitor.block_influence.tolist()))
    assert counts[0][0] == counts[1][0]


def test_teacher_dtype_and_the_loss_method_of_a_module_with_its_own_loss(tmp_path):
    class OwnLoss(TinyLM):
        def training_step(self, batch, batch_idx):
            out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            logits = out.logits[:, :-1].flatten(0, 1)
            targets = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100).flatten()
            lm = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100)
            return self.distiller.loss(out, batch, lm)

    distil = DistillationCallback(teacher="initial", alpha=0.5, teacher_dtype="bfloat16")
    module = OwnLoss()
    module.distiller = distil
    fast_trainer(tmp_path, callbacks=[distil, LayerPruneCallback(num_layers=1, at_steps=[1])], max_steps=3).fit(module, loader())
    assert next(distil.teacher.parameters()).dtype == torch.bfloat16
    assert distil.last["kd_loss"] > 0 and "lm_loss" in distil.last


def test_a_training_step_without_labels_or_loss_call_is_stopped(tmp_path):
    class NoLabels(TinyLM):
        def training_step(self, batch, batch_idx):
            logits = self.model(input_ids=batch["input_ids"]).logits
            return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["input_ids"][:, 1:].flatten())

    with pytest.raises(RuntimeError, match="ran without distillation"):
        fast_trainer(tmp_path, callbacks=[DistillationCallback(teacher="initial")], max_steps=2).fit(NoLabels(), loader())


def test_a_pruner_listed_first_takes_the_teacher_for_the_next_batch_not_this_one(tmp_path):
    distil = DistillationCallback(teacher="before_first_prune")
    fast_trainer(tmp_path, callbacks=[LayerPruneCallback(num_layers=2, at_steps=[2]), distil], max_steps=4).fit(TinyLM(), loader())
    assert distil.teacher_taken_at == 2 and distil.last["kd_loss"] > 0


def test_a_forward_given_labels_cannot_be_mixed_again_by_the_loss_method(tmp_path):
    class LabelsAndOwnLoss(TinyLM):
        def training_step(self, batch, batch_idx):
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
            return self.distiller.loss(out, batch, out.loss)

    module = LabelsAndOwnLoss()
    module.distiller = DistillationCallback(teacher="initial")
    with pytest.raises(ValueError, match="`student_outputs` come from a forward given `labels`.*without `labels`"):
        fast_trainer(tmp_path, callbacks=[module.distiller], max_steps=1).fit(module, loader())


def test_a_student_called_positionally_gives_the_teacher_its_attention_mask(tmp_path):
    class Positional(TinyLM):
        def training_step(self, batch, batch_idx):
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            return self.model(batch["input_ids"], batch["attention_mask"], labels=labels).loss

    ids = torch.randint(1, 128, (4, 12))
    mask = torch.ones_like(ids)
    mask[0, :5] = mask[2, :3] = 0  # left padding: without the mask the teacher attends to the pads
    batches = [{"input_ids": i, "attention_mask": m} for i, m in zip(ids.masked_fill(mask == 0, 0), mask)]
    distil = DistillationCallback(teacher="initial")  # the teacher is the student at the first step
    fast_trainer(tmp_path, callbacks=[distil], max_steps=1).fit(Positional(), torch.utils.data.DataLoader(batches, batch_size=4))
    assert distil.last["kd_loss"] == pytest.approx(0.0, abs=1e-7)


def test_the_fingerprint_is_gathered_on_the_strategy_device():
    """NCCL gathers only tensors on the GPU; a stub strategy on the meta device records what it is given."""
    gathered = []
    strategy = SimpleNamespace(root_device=torch.device("meta"), all_gather=lambda t: gathered.append(t) or t)
    trainer = SimpleNamespace(strategy=strategy, ckpt_path=None, global_step=0)
    distil = DistillationCallback(teacher="initial")
    distil.on_fit_start(trainer, TinyLM())
    distil.teardown(trainer, None, "fit")
    assert [t.device for t in gathered] == [torch.device("meta")]


def test_a_frozen_copy_copies_neither_the_hooks_nor_the_objects_that_own_them():
    class Owner:
        copies = 0

        def __init__(self):
            self.big = torch.zeros(1000)

        def __deepcopy__(self, memo):
            Owner.copies += 1
            return Owner()

        def hook(self, *args):
            return None

    model, owner = tiny_model(num_layers=2), Owner()
    block = get_decoder_layers(model)[0]
    block.register_forward_hook(owner.hook)
    block.register_full_backward_hook(owner.hook)
    model.register_forward_pre_hook(owner.hook, with_kwargs=True)
    twin = frozen_copy(model)
    assert Owner.copies == 0
    hook_dicts = [v for m in twin.modules() for k, v in vars(m).items()
                  if k.startswith(("_forward", "_backward")) and "hook" in k and isinstance(v, dict)]
    assert hook_dicts and not any(hook_dicts)
    assert block._forward_hooks and model._forward_pre_hooks  # the original keeps its hooks
    ids = torch.randint(1, 128, (2, 8))
    torch.testing.assert_close(twin(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_hidden_state_alignment_adds_a_term_that_is_zero_before_any_removal(tmp_path):
    distil = DistillationCallback(teacher="initial", hidden_weight=1.0)
    probe = GradProbe()
    fast_trainer(tmp_path, callbacks=[distil, probe], max_steps=1).fit(TinyLM(), loader(length=4))
    assert distil.last["hidden_loss"] == pytest.approx(0.0, abs=1e-6)
    fast_trainer(tmp_path, callbacks=[distil, LayerPruneCallback(num_layers=2, at_steps=[1])], max_steps=3).fit(TinyLM(), loader())
    assert distil.last["hidden_loss"] > 0


def test_a_given_teacher_module_of_another_depth_cannot_align_hidden_states(tmp_path):
    distil = DistillationCallback(teacher=tiny_model(num_layers=LAYERS - 1), hidden_weight=0.5)
    with pytest.raises(ValueError, match="original depth"):
        fast_trainer(tmp_path, callbacks=[distil], max_steps=1).fit(TinyLM(), loader())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(teacher="dense"), "`teacher` must be one of"),
        (dict(alpha=1.5), "`alpha`"),
        (dict(temperature=0.0), "`temperature`"),
        (dict(top_k=0), "`top_k`"),
        (dict(hidden_weight=-1.0), "`hidden_weight`"),
        (dict(teacher_dtype="int8"), "`teacher_dtype` must be a floating torch.dtype .* or None, got 'int8'"),
        (dict(chunk_size=0), "`chunk_size`"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistillationCallback(**kwargs)


# ============================================================================================ checkpoints
def _params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("teacher", ["initial", "before_first_prune"])
def test_resume_after_a_removal_with_kd_equals_the_uninterrupted_run(tmp_path, teacher):
    def run(root, max_steps, checkpoint=None, ckpt=None):
        module, distil = TinyLM(lr=1e-2, scheduler=True), DistillationCallback(teacher=teacher, alpha=0.5)
        callbacks = [distil, LayerPruneCallback(num_layers=2, at_steps=[3]), *([checkpoint] if checkpoint else [])]
        trainer = fast_trainer(root, callbacks=callbacks, max_steps=max_steps, enable_checkpointing=checkpoint is not None)
        trainer.fit(module, loader(length=16), ckpt_path=ckpt)
        return module, distil

    full, full_distil = run(tmp_path / "full", 8)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    run(tmp_path / "crash", 4, checkpoint)
    resumed, resumed_distil = run(tmp_path / "resume", 8, ckpt=str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt"))
    assert resumed_distil.teacher_taken_at == full_distil.teacher_taken_at
    assert len(get_decoder_layers(resumed_distil.teacher)) == LAYERS
    for (k, a), b in zip(_params(full_distil.teacher).items(), _params(resumed_distil.teacher).values()):
        assert torch.equal(a, b), k
    for (k, a), b in zip(_params(full).items(), _params(resumed).values()):
        torch.testing.assert_close(a, b, msg=k)


def test_resume_with_teacher_initial_from_a_checkpoint_without_it_is_refused(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    fast_trainer(tmp_path, callbacks=[checkpoint], max_steps=2, enable_checkpointing=True).fit(TinyLM(), loader())
    trainer = fast_trainer(tmp_path, callbacks=[DistillationCallback(teacher="initial")], max_steps=4)
    with pytest.raises(ValueError, match="holds no teacher"):
        trainer.fit(TinyLM(), loader(), ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=2.ckpt"))


def test_resume_with_another_teacher_module_is_refused(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    distil = DistillationCallback(teacher=tiny_model(seed=1))
    fast_trainer(tmp_path, callbacks=[distil, checkpoint], max_steps=2, enable_checkpointing=True).fit(TinyLM(), loader())
    again = DistillationCallback(teacher=tiny_model(seed=2))
    with pytest.raises(ValueError, match="differs from the run's"):
        fast_trainer(tmp_path, callbacks=[again], max_steps=4).fit(TinyLM(), loader(), ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=2.ckpt"))


def test_the_same_teacher_module_resumes(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    teacher = tiny_model(seed=1)
    fast_trainer(tmp_path, callbacks=[DistillationCallback(teacher=copy.deepcopy(teacher)), checkpoint], max_steps=2,
                 enable_checkpointing=True).fit(TinyLM(), loader())
    distil = DistillationCallback(teacher=teacher)
    fast_trainer(tmp_path, callbacks=[distil], max_steps=4).fit(TinyLM(), loader(), ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=2.ckpt"))
    assert distil.last["kd_loss"] > 0


# ============================================================================================ DDP
def test_two_process_ddp_equals_a_single_process(tmp_path, ddp_runs):
    from ddp_script import distill

    distill(tmp_path, ddp=False)  # the same job in this process, batches of 4
    single = torch.load(tmp_path / "rank0.pt", weights_only=False)
    rank0, rank1 = ddp_runs("distill")
    assert rank0["teacher_fingerprint"] == rank1["teacher_fingerprint"] == single["teacher_fingerprint"]
    assert rank0["num_layers"] == single["num_layers"] == LAYERS - 2
    for name, value in single["state"].items():
        assert torch.equal(rank0["state"][name], rank1["state"][name]), name  # the ranks never diverged
        torch.testing.assert_close(rank0["state"][name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_the_package_causal_lm_module_needs_no_change(tmp_path):
    from lp_callbacks.harness.module import CausalLMModule

    distil = DistillationCallback(teacher="before_first_prune", alpha=1.0, top_k=8)
    module = CausalLMModule(tiny_model().train(), lr=1e-3)
    fast_trainer(tmp_path, callbacks=[distil, LayerPruneCallback(num_layers=2, at_steps=[1])], max_steps=3).fit(module, loader())
    assert distil.teacher_taken_at == 1 and distil.last["kd_loss"] > 0
