"""An in-place op and its out-of-place twin, declared together (:func:`define_pair`).

From one argument list it derives both schemas (the in-place one marks what it writes ``Tensor(a!)`` and
returns nothing), both fakes, the out-of-place op's autograd registration, the in-place autograd.Function
(from the out-of-place backward), and the one path every public function takes:
:meth:`OpPair.call_inplace` / :meth:`OpPair.call` (autograd checks before anything is written, the traced
form under ``torch.compile``, the plain call).
"""

from __future__ import annotations

import operator

import torch

from .checks import check_inplace_autograd, reraise_with_check, skip_value_checks
from .registry import NAMESPACE, define, grad_refusal, register_autograd

_BELOW_AUTOGRAD = torch._C._AutoDispatchBelowAutograd


def _arg_names(args: str) -> list[str]:
    return [a.split()[-1] for a in args.split(", ")]


class OpPair:
    """``posenc::<name>_`` (in place, returns nothing) and ``posenc::<name>`` (out of place, returns the new
    values of what the in-place op writes), made by :func:`define_pair`. ``inplace`` / ``out`` are their
    overloads; :meth:`call_inplace` and :meth:`call` are what the public functions call."""

    def __init__(self, name, args, *, mutates, check, body, launchers, setup_context, backward, native=False,
                 differentiable=None, functional_only=None, separable=False, jvp=None, save_inputs=False,
                 compile_inplace=False):  # fmt: skip
        names = _arg_names(args)
        self.differentiable = tuple(mutates if differentiable is None else differentiable)
        self.compile_inplace = compile_inplace
        self.name, self.names = name, names
        self.mutated = tuple(names.index(m) for m in mutates)
        self.functional_only = dict(functional_only or {})
        self.separable = separable
        self.save_inputs = save_inputs
        self._drop = tuple(names.index(n) for n in self.functional_only)
        # The in-place op's arguments out of the out-of-place list, at C speed (a decode call's host cost).
        get = operator.itemgetter(*(i for i in range(len(names)) if i not in self._drop))
        self._inplace_args = (lambda args: tuple(get(args))) if self._drop else (lambda args: args)
        self._setup_context, self._backward = setup_context, backward
        decl = [a for a in args.split(", ") if a.split()[-1] not in self.functional_only]
        for tag, m in zip("abcdefgh", mutates):
            i = [a.split()[-1] for a in decl].index(m)
            typ, arg = decl[i].split()
            decl[i] = f"Tensor({tag}!){typ[len('Tensor'):]} {arg}"
        returns = "Tensor" if len(mutates) == 1 else "(" + ", ".join(["Tensor"] * len(mutates)) + ")"

        def impl(launcher, inplace):
            def run(*args):
                full = self._full(args) if inplace else args
                outs = tuple(full[i] for i in self.mutated) if inplace else self._empty_outs(full)
                body(launcher, outs, *full)
                return None if inplace else (outs[0] if len(outs) == 1 else outs)

            return run

        def fake_out(*args):
            outs = self._empty_outs(args)
            return outs[0] if len(outs) == 1 else outs

        self.inplace = define(
            f"{name}_({', '.join(decl)}) -> ()",
            check=lambda *a, values: check(*self._full(a), values=values, inplace=True),
            fake=lambda *a: None,
            impls={k: impl(v, True) for k, v in launchers.items()},
            native=native,
        )
        self.out = define(
            f"{name}({args}) -> {returns}",
            check=lambda *a, values: check(*a, values=values, inplace=False),
            fake=fake_out,
            impls={k: impl(v, False) for k, v in launchers.items()},
            native=native,
        )
        self.check = check
        self.has_jvp = jvp is not None
        register_autograd(name, backward, setup_context=setup_context, differentiable=self.differentiable, jvp=jvp)
        self.function = self._inplace_function()

    # -- argument plumbing
    def _full(self, inplace_args) -> tuple:
        """The in-place op's arguments with the out-of-place-only ones at their defaults inserted."""
        full, it = [], iter(inplace_args)
        for i, n in enumerate(self.names):
            full.append(self.functional_only[n] if i in self._drop else next(it))
        return tuple(full)

    def _empty_outs(self, args) -> tuple:
        ref = args[self.mutated[0]]
        return tuple(torch.empty_like(args[i]) if args[i] is not None else ref.new_empty(0) for i in self.mutated)

    def _inplace_function(self):
        pair = self

        class Function(torch.autograd.Function):
            """Autograd of the in-place op (PyTorch cannot register a formula for a mutating op): marks what
            it writes dirty (PyTorch's in-place rules then apply), backward is the out-of-place formula."""

            @staticmethod
            def forward(ctx, *args):
                before = args
                if pair.save_inputs:  # backward needs the written tensors as they were: keep copies
                    before = tuple(a.clone() if i in pair.mutated and a is not None else a for i, a in enumerate(args))
                pair.inplace(*pair._inplace_args(args))
                written = tuple(args[i] for i in pair.mutated if args[i] is not None)
                ctx.mark_dirty(*written)
                ctx.present = tuple(args[i] is not None for i in pair.mutated)
                pair._setup_context(ctx, before, written)
                return written[0] if len(written) == 1 else written

            @staticmethod
            def backward(ctx, *grads):
                it = iter(grads)
                return pair._backward(ctx, *(next(it) if ctx.present[j] else None for j in range(len(pair.mutated))))

        Function.__name__ = Function.__qualname__ = f"{self.name}_inplace_function"
        return Function

    # -- the public call paths
    def _dual(self, args) -> bool:
        """Whether an argument carries a forward-mode tangent; one the op cannot differentiate (or any, for
        an op without a jvp) is refused here, before anything is written."""
        if torch.autograd.forward_ad._current_level < 0:
            return False
        dual = False
        for n, a in zip(self.names, args):
            if isinstance(a, torch.Tensor) and torch.autograd.forward_ad.unpack_dual(a).tangent is not None:
                if not self.has_jvp or n not in self.differentiable:
                    raise NotImplementedError(
                        f"forward-mode AD is not supported by {NAMESPACE}::{self.name} w.r.t. {n} ({n} is a dual tensor)"
                    )
                dual = True
        return dual

    def _autograd(self, args) -> bool:
        """Forward AD the op cannot do, and gradients it does not give, are refused before anything is
        written (never a silent zero or None); returns whether reverse mode records."""
        self._dual(args)
        if not torch.is_grad_enabled():
            return False
        records = False
        for n, a in zip(self.names, args):
            if isinstance(a, torch.Tensor) and a.requires_grad:
                if n not in self.differentiable:
                    raise ValueError(grad_refusal(self.name, n, self.differentiable))
                records = True
        return records

    def call(self, *args):
        """The out-of-place op (autograd through its registered formula). When nothing records a gradient
        and no tangent flows, the call goes below the Autograd key: the op's autograd kernel is Python
        (``register_autograd``) and would only redispatch, at about the cost of a decode kernel. The same
        dispatcher op runs (its checks, fakes, profiler name); compiled code takes the ordinary path."""
        # the decode fast path (per token: inlined); compiled code never reaches the C check (dynamo skips it)
        if not torch.compiler.is_compiling() and torch.autograd.forward_ad._current_level < 0 and not (
            torch.is_grad_enabled() and torch._C._any_requires_grad(*args)
        ):
            try:
                with _BELOW_AUTOGRAD():
                    return self.out(*args)
            except (RuntimeError, ValueError, TypeError) as e:
                reraise_with_check(e, self.check, *args, inplace=False)
        self._autograd(args)
        try:
            return self.out(*args)
        except (RuntimeError, ValueError, TypeError) as e:
            reraise_with_check(e, self.check, *args, inplace=False)

    def inplace_fast(self, args: tuple) -> bool:
        """The in-place op's decode fast path, on the op's own argument tuple: the op itself when nothing
        records a gradient, no tangent flows and nothing is being compiled (its checks, errors and profiler
        name are the op's); False, having done nothing, where it does not apply (:meth:`call_inplace` then
        takes the autograd or traced path). One C call tells whether anything requires grad: this call's
        host cost is per token."""
        if torch.compiler.is_compiling() or torch.autograd.forward_ad._current_level >= 0:
            return False
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return False
        try:
            self.inplace(*(self._inplace_args(args) if self._drop else args))
        except (RuntimeError, ValueError, TypeError) as e:
            reraise_with_check(e, self.check, *args, inplace=True)
        return True

    def call_inplace(self, *args) -> None:
        """The in-place op: the plain call; its autograd.Function when gradients are recorded (every check,
        autograd's own in-place errors included, raised before anything is written); under torch.compile
        the out-of-place op with its result copied back (PyTorch 2.13 drops the backward of a traced
        Function that marks an input dirty, and regenerates two views of one base at offset 0 under
        dynamic shapes)."""
        if self.inplace_fast(args):  # the decode fast path: nothing records, nothing is traced
            return
        if self.compile_inplace and torch.compiler.is_compiling():
            # an op that writes buffers (a KV cache) and records no gradient: the mutating op itself, which
            # the compiler functionalises and re-inplaces (a copy-back would copy the whole buffer per call)
            self._autograd(args)
            self.inplace(*(self._inplace_args(args) if self._drop else args))
            return
        if torch.compiler.is_compiling() or self._dual(args):
            # Forward AD takes this path too: the out-of-place op's jvp, and copy_ carries the tangent into
            # the written tensor (checked first: nothing is written on an error).
            self._autograd(args)
            if not torch.compiler.is_compiling():
                self.check(*args, values=True, inplace=True)
                for i in self.mutated:
                    if args[i] is not None:
                        check_inplace_autograd(self.names[i], args[i], grad_from_other_input=True)
            # save_inputs: the out-of-place op saves its inputs, which the copy-back below then changes
            call = tuple(a.clone() if self.save_inputs and i in self.mutated and a is not None else a
                         for i, a in enumerate(args))  # fmt: skip
            new = self.out(*call)
            for i, t in zip(self.mutated, (new,) if len(self.mutated) == 1 else new):
                if args[i] is not None:
                    args[i].copy_(t)
            return
        self._autograd(args)  # a gradient asked of an argument the op does not differentiate: refused here
        self.check(*args, values=True, inplace=True)
        others = any(
            isinstance(a, torch.Tensor) and a.requires_grad for i, a in enumerate(args) if i not in self.mutated
        )
        for i in self.mutated:
            if args[i] is not None:
                check_inplace_autograd(self.names[i], args[i], grad_from_other_input=others)
        # One Function per written tensor when they are independent (autograd lets a Function that writes
        # views in place return only one of them): each in the first written slot, the others None.
        if self.separable:
            calls = [self._alone(args, i) for i in self.mutated if args[i] is not None]
        else:
            calls = [args]
        with skip_value_checks():  # checked just above
            for a in calls:
                self.function.apply(*a)

    def _alone(self, args, i) -> tuple:
        out = list(args)
        for j in self.mutated:
            out[j] = None
        out[self.mutated[0]] = args[i]
        return tuple(out)

def define_pair(name: str, args: str, **kwargs) -> OpPair:
    """Declare ``posenc::<name>_`` and ``posenc::<name>`` from one argument list (the out-of-place schema's;
    see :class:`OpPair`):

    * ``mutates``: the arguments the in-place op writes (``Tensor`` or ``Tensor?``); the out-of-place op
      returns their new values, a 0-element tensor for an absent optional one;
    * ``check(*args, values, inplace)``: every argument rule, on the out-of-place argument list;
    * ``body(launcher, outs, *args)`` writes the results into ``outs`` (the written arguments themselves in
      place, fresh tensors out of place) with one backend's ``launcher`` from ``launchers``;
    * ``setup_context(ctx, args, output)`` / ``backward(ctx, *grads)``: the out-of-place op's autograd
      formula (one gradient per written argument, None where absent), reused by the in-place Function;
    * ``differentiable``: the arguments that get gradients (default: ``mutates``); another argument that
      requires grad is an error, never a silent None;
    * ``functional_only``: arguments (name -> the value the in-place op stands for) only the out-of-place
      op takes; ``separable``: each written tensor can be processed alone in the first written slot;
    * ``jvp(primals, tangents)``: the out-of-place op's forward-mode formula (see
      :func:`posenc_kernels.ops.registry.register_autograd`); without it forward AD is refused. The in-place
      op under forward AD runs the out-of-place op and copies its result (and tangent) back.
    * ``compile_inplace``: under ``torch.compile`` the in-place op itself runs (functionalised, then
      re-inplaced by inductor) rather than the out-of-place twin plus a copy-back; for ops that record no
      gradient and write large buffers (a KV cache);
    * ``save_inputs``: the backward needs the written tensors' values before the write (RMSNorm's does):
      the in-place autograd.Function hands ``setup_context`` copies of them, taken only when autograd
      records (the out-of-place op's inputs are never written, so it saves them as they are).
    """
    return OpPair(name, args, **kwargs)
