"""The tied teacher (spec §8 step 4, §9): the frozen converted init, computed by the student's own modules.

A LoRA student only changes its adapters and a few fully trained modules (x_embedder, proj_out, norm_out). The
teacher is therefore the student with its adapters disabled and those modules swapped, for one forward, for frozen
copies of their converted-init values — no second copy of the base. Under DeepSpeed ZeRO-3 the base stays
partitioned (the teacher's forward gathers it through the same module hooks as the student's), and the teacher's
only own memory is the fully trained modules' copies (~80 MB at 9B, against 18 GB for a whole bf16 copy).
"""
from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn

from .trainable import build_teacher, has_adapter


def family_full_modules(model: nn.Module) -> tuple[str, ...]:
    """The fully trained modules of the model's family (its patch read-in, read-out and output norm: FLUX.2's and
    FLUX.1's x_embedder, proj_out, norm_out; SD3's pos_embed.proj, ...), which a teacher must hold frozen copies of."""
    from .families import detect_family

    return detect_family(model).full_modules


def _adapter_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Every PEFT adapter layer of `model` computes its base layer only; requires_grad flags are restored exactly.

    peft's `enable_adapters` toggles requires_grad as a side effect; a trainer's optimizer (and ZeRO-3's gradient
    hooks) were set up from the flags before, so they must come back as they were.
    """
    layers = _adapter_layers(model)
    flags = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for p, flag in flags:
            p.requires_grad_(flag)


@contextmanager
def modules_swapped(model: nn.Module, replacements: dict[str, nn.Module]) -> Iterator[None]:
    """Replace the submodules named by `replacements` (dotted paths) for the block's duration."""
    originals: dict[str, nn.Module] = {}
    try:
        for path, module in replacements.items():
            parent_path, _, attr = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            originals[path] = getattr(parent, attr)
            setattr(parent, attr, module)
        yield
    finally:
        for path, module in originals.items():
            parent_path, _, attr = path.rpartition(".")
            setattr(model.get_submodule(parent_path) if parent_path else model, attr, module)


def owner_and_name(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    """(the module holding the dotted `path`'s last attribute, that attribute's name)."""
    parent_path, _, attr = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), attr


def is_parameter_path(model: nn.Module, path: str) -> bool:
    """True if `path` names a parameter held directly by a module (Sana's scale_shift_table), not a module."""
    owner, attr = owner_and_name(model, path)
    return attr in owner._parameters


@contextmanager
def parameters_swapped(model: nn.Module, replacements: dict[str, nn.Parameter]) -> Iterator[None]:
    """Replace the parameters named by `replacements` (dotted paths) while the forward of the module holding each
    runs, within the block.

    Swapped by a forward pre-hook and put back by a forward hook run first, not around the whole block: under
    DeepSpeed ZeRO-3 the owning module's own hooks gather its partitioned parameters before its forward and release
    them after (ZeRO-3 registers them when the engine is built, so a pre-hook added now runs after the gather, and
    a forward hook prepended now before the release); a plain tensor in their place would break both. Without ZeRO-3
    the hooks alone do the swap. Whatever is still swapped on exit (a forward that raised) is put back.
    """
    by_owner: dict[int, tuple[nn.Module, list[tuple[str, nn.Parameter]]]] = {}
    for path, param in replacements.items():
        owner, attr = owner_and_name(model, path)
        if attr not in owner._parameters:
            raise ValueError(f"{path!r} is not a parameter of {type(model).__name__}")
        by_owner.setdefault(id(owner), (owner, []))[1].append((attr, param))
    originals: dict[tuple[int, str], nn.Parameter] = {}

    def swap_in(owner: nn.Module, items: list[tuple[str, nn.Parameter]]) -> None:
        for attr, param in items:
            originals.setdefault((id(owner), attr), owner._parameters[attr])
            owner._parameters[attr] = param

    def swap_back(owner: nn.Module, items: list[tuple[str, nn.Parameter]]) -> None:
        for attr, _ in items:
            if (id(owner), attr) in originals:
                owner._parameters[attr] = originals.pop((id(owner), attr))

    handles = []
    try:
        for owner, items in by_owner.values():
            handles.append(owner.register_forward_pre_hook(lambda m, args, items=items: swap_in(m, items)))
            handles.append(owner.register_forward_hook(lambda m, args, out, items=items: swap_back(m, items),
                                                       prepend=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for owner, items in by_owner.values():
            swap_back(owner, items)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """`model.eval()` for the block (the teacher recovers with the eval σ_min, no dropout); flags restored per module."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


class TiedTeacher(nn.Module):
    """Callable like the student; computes the converted init through the student's modules (see module docstring).

    Build it on the freshly converted student, BEFORE `apply_trainable` and before any parallel wrapper partitions
    the student: the copies of `own_modules` must hold the converted-init values. The student is held by reference,
    not registered as a submodule, so `.to()`, `state_dict()` and `parameters()` of the teacher cover only its own
    frozen copies. Sound for a LoRA student whose base is frozen; a fully trained student needs a full copy
    (`asymflow.trainable.build_teacher(share_base=False)`).
    """

    def __init__(self, student: nn.Module, own_modules: Sequence[str] | None = None):
        super().__init__()
        if has_adapter(student):
            raise ValueError("tie the teacher before LoRA is attached to the student (apply_trainable)")
        object.__setattr__(self, "_student", student)
        self._paths = tuple(family_full_modules(student) if own_modules is None else own_modules)
        # A fully trained parameter held directly by a module (Sana's output modulation scale_shift_table) is kept
        # apart from the module copies: it is swapped differently (`parameters_swapped`).
        self._param_paths = tuple(path for path in self._paths if is_parameter_path(student, path))
        self.frozen = nn.ModuleDict({path.replace(".", "__"): copy.deepcopy(student.get_submodule(path))
                                     for path in self._paths if path not in self._param_paths})
        self.frozen_parameters = nn.ParameterDict(
            {path.replace(".", "__"): copy.deepcopy(student.get_parameter(path)) for path in self._param_paths})
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> TiedTeacher:
        """Always eval: the teacher is frozen (its forward puts the student in eval mode for the call)."""
        return super().train(False)

    @property
    def student(self) -> nn.Module:
        return self._student

    @property
    def proj_buffer(self) -> torch.Tensor:
        return self._student.proj_buffer  # B and s are never trained: the student's own buffers are the init's

    @property
    def scale_buffer(self) -> torch.Tensor:
        return self._student.scale_buffer

    @property
    def config(self) -> Any:
        return self._student.config

    def own_bytes(self) -> int:
        """Bytes the teacher holds beyond the student: its frozen copies of the fully trained modules."""
        return sum(t.numel() * t.element_size() for t in (*self.parameters(), *self.buffers()))

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        student = self._student
        modules = {path: self.frozen[path.replace(".", "__")] for path in self._paths if path not in self._param_paths}
        params = {path: self.frozen_parameters[path.replace(".", "__")] for path in self._param_paths}
        with (torch.no_grad(), adapters_disabled(student), modules_swapped(student, modules),
              parameters_swapped(student, params), eval_mode(student)):
            return student(*args, **kwargs)


def make_teacher(
    student: nn.Module, kind: Literal["tied", "copy"], own_modules: Sequence[str] | None = None
) -> nn.Module:
    """The frozen teacher of a freshly converted student (call before `apply_trainable`): tied or a full copy.
    `own_modules`: the modules the student trains in full, by default its family's (`family_full_modules`)."""
    if kind == "tied":
        return TiedTeacher(student, own_modules)
    if kind == "copy":
        own = family_full_modules(student) if own_modules is None else own_modules
        return build_teacher(student, share_base=False, own_modules=own)
    raise ValueError(f"unknown teacher kind {kind!r}; expected 'tied' or 'copy'")
