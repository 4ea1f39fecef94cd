"""`cr.explain`: the chain-rule table of one backward pass, for people.

`explain(loss, *args)` runs `loss` on chainrule's tape, runs the backward pass
itself, and keeps what a textbook walk-through shows at every node: the value
(forward pass), the local derivative of the node's output with respect to each
input, the upstream gradient arriving at the node and the gradient it sends to
each input (upstream x local: the chain rule). The result renders as a text
table (`print`), as HTML (notebooks), and as a Graphviz graph (`to_dot()`).

Arrays are summarised (dtype, shape, norm, mean, min, max); scalars are shown
exactly. Inputs are named after the function's parameters; intermediate values
after the variable they are assigned to on their source line (`s = y_hat - y`)
or `t1, t2, ...`; `names=` renames anything.

Examples:
  >>> import chainrule as cr
  >>> def loss(w, x, y):
  ...     y_hat = w * x
  ...     s = y_hat - y
  ...     return s**2
  >>> e = cr.explain(loss, 1.0, 1.0, 2.0)
  >>> [(r.name, float(r.value), float(r.upstream)) for r in e.rows]
  [('loss', 1.0, 1.0), ('s', -1.0, -2.0), ('y_hat', 1.0, -2.0), ('w', 1.0, -2.0)]
  >>> float(e.grads)
  -2.0
"""

from __future__ import annotations

import ast
import dataclasses
import html
import inspect
import linecache
import os
import re
import shutil
import subprocess
import textwrap
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax import lax

from chainrule.engine import core, debugging, host, transforms
from chainrule.engine.core import Node, Tracer, raw
from chainrule.engine.rules.registry import FORMULA_FUNCTIONS
from chainrule.errors import ChainruleError

__all__ = ["Edge", "Explanation", "GraphvizNotFoundError", "Row", "explain"]

_G = "ḡ"  # the upstream gradient in rule formulas


class GraphvizNotFoundError(ChainruleError, RuntimeError):
    """Rendering the graph needs Graphviz's `dot` program, which is not installed."""


@dataclasses.dataclass(frozen=True)
class Edge:
    """One input of a node, as the backward pass sees it.

    Attributes:
      input: the input's name.
      formula: the local derivative d(node)/d(input) as a formula in the
        operands' names (e.g. "2·s"), or, for array rules, the map applied to
        the upstream gradient ḡ (e.g. "ḡ ↦ ḡ @ w1ᵀ").
      local: the local derivative as a number when the node and the input are
        scalars (computed by pulling a cotangent of 1 back through the node),
        else None.
      gradient: the gradient sent to the input (upstream x local), None when
        the rule sends a structural zero.
    """

    input: str
    formula: str
    local: Any
    gradient: Any


@dataclasses.dataclass(frozen=True)
class Row:
    """One node of the graph: an operation, or an input of the function.

    Attributes:
      name: the node's name (argument name, variable name, or t1, t2, ...).
      op: the primitive's name ("mul", "relu", ...), or "input".
      expr: the operation in the operands' names (e.g. "w · x").
      source: the user's source line that created it, "file:line (function)".
      value: the node's value (numpy array).
      upstream: the gradient of the output with respect to this node.
      edges: one `Edge` per differentiated input of the node.
    """

    name: str
    op: str
    expr: str
    source: str | None
    value: Any
    upstream: Any
    edges: tuple[Edge, ...] = ()

    def edge(self, input_name: str) -> Edge:
        """The edge to the input called `input_name`."""
        for e in self.edges:
            if e.input == input_name:
                return e
        raise KeyError(f"{self.name} has no input {input_name!r}; inputs: "
                       f"{[e.input for e in self.edges]}")  # fmt: skip


class Explanation:
    """The chain-rule table of `fun` at one point; see `explain`.

    Attributes:
      fun_name: the function's name.
      output: the name of the output node.
      value: the function's value (numpy scalar).
      grads: the gradient, exactly as `cr.grad(fun, argnums)(*args)` returns it.
      rows: one `Row` per node in backward order (output first, inputs last).
      constants: (name, value) of the inputs that were not differentiated.
      nan_report: where the backward pass first turned a finite cotangent into
        NaN or inf, with the likely cause (the report of `check_finite=True`),
        else None.
    """

    def __init__(
        self,
        fun_name,
        output,
        value,
        grads,
        rows,
        constants,
        differentiated,
        edges_in,
        nan_report=None,
    ):
        self.nan_report: str | None = nan_report
        self.fun_name = fun_name
        self.output = output
        self.value = value
        self.grads = grads
        self.rows: tuple[Row, ...] = tuple(rows)
        self.constants: tuple[tuple[str, Any], ...] = tuple(constants)
        self._differentiated = tuple(differentiated)
        self._const_edges = edges_in  # row name -> constant inputs it uses

    # --- accessors ------------------------------------------------------------

    @property
    def forward(self) -> tuple[Row, ...]:
        """The operations in the order they ran (forward pass)."""
        return tuple(r for r in reversed(self.rows) if r.op != "input")

    @property
    def inputs(self) -> tuple[Row, ...]:
        """The differentiated inputs; their `upstream` is the gradient."""
        return tuple(r for r in self.rows if r.op == "input")

    def row(self, name: str) -> Row:
        """The row of the node called `name`."""
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no node named {name!r}; nodes: {[r.name for r in self.rows]}")

    # --- text -------------------------------------------------------------------

    def to_text(self, width: int = 100) -> str:
        """The three steps as text no wider than `width` columns."""
        out = self.output
        lines = [_wrap_line(self._title(), width)]
        if self.constants:
            consts = ", ".join(f"{n} = {_short(v)}" for n, v in self.constants)
            lines.append(_wrap_line(f"not differentiated (constants): {consts}", width))
        lines += ["", "1. forward pass"]
        fwd = self.forward
        nw = max((len(r.name) for r in fwd), default=0)
        ew = max((len(r.expr) for r in fwd), default=0)
        vw = max((len(_short(r.value)) for r in fwd), default=0)
        for r in fwd:
            code = _code(r.source)
            text = f"   {r.name:<{nw}} = {r.expr:<{ew}} = {_short(r.value):<{vw}}"
            where = f"   [{_loc(r.source)}] {code}" if code else ""
            lines.append(_clip(text + where, width).rstrip())
        lines += [
            "",
            "2. local gradients and 3. backward pass, output first "
            "(chain rule: sent = upstream × local)",
        ]
        lines[-1] = _wrap_line(lines[-1], width)
        header = [
            ["node"],
            ["operation"],
            ["value"],
            ["upstream", f"∂{out}/∂node"],
            ["local", "∂node/∂input"],
            ["sent", f"∂{out}/∂input"],
        ]
        table = []
        for r in self.rows:
            op = [r.expr, f"at {_loc(r.source)}"] if r.source else [r.expr]
            first = [[r.name], op, _cell(r.value), _cell(r.upstream), [], []]
            subrows = [first]
            for i, e in enumerate(r.edges):
                cells = first if i == 0 else [[], [], [], [], [], []]
                if i:
                    subrows.append(cells)
                cells[4] = [_local_text(r.name, e)]
                cells[5] = _sent_cell(out, r, e)
            table.extend(subrows)
        lines += _table(header, table, width)
        lines.append("")
        for r in self.inputs:
            lines.append(_clip(f"gradient: ∂{out}/∂{r.name} = {_short(r.upstream)}", width))
        if any(np.ndim(r.value) for r in self.rows):
            lines.append("arrays: dtype[shape], ‖‖ = norm, μ = mean, [min, max]")
        if self.nan_report:
            report = f"NaN provenance: {self.nan_report}".split("\n")
            lines += ["", *(_wrap_line(t, width) for t in report)]
        return "\n".join(lines)

    def _title(self) -> str:
        wrt = ", ".join(self._differentiated) or "nothing"
        return f"cr.explain: {self.fun_name} = {_short(self.value)}, differentiated w.r.t. {wrt}"

    def __str__(self) -> str:
        return self.to_text()

    def __repr__(self) -> str:
        return self.to_text()

    # --- HTML -------------------------------------------------------------------

    def _repr_html_(self) -> str:
        """The same table for notebooks."""
        e = html.escape
        out = self.output
        parts = [
            '<div class="chainrule-explain">',
            f"<p><b>{e(self._title())}</b></p>",
        ]
        if self.constants:
            consts = ", ".join(f"{n} = {_short(v)}" for n, v in self.constants)
            parts.append(f"<p>not differentiated (constants): {e(consts)}</p>")
        parts.append("<p><b>1. forward pass</b></p><ul>")
        for r in self.forward:
            code = _code(r.source)
            where = f" <small>[{e(_loc(r.source))}] <code>{e(code)}</code></small>" if code else ""
            parts.append(
                f"<li><code>{e(r.name)} = {e(r.expr)} = {e(_short(r.value))}</code>{where}</li>"
            )
        parts.append(
            "</ul><p><b>2. local gradients and 3. backward pass</b>, output first: the gradient "
            f"sent to an input is upstream ∂{e(out)}/∂node × local ∂node/∂input</p>"
        )
        heads = [
            "node",
            "operation",
            "value",
            f"upstream ∂{out}/∂node",
            "local ∂node/∂input",
            f"sent ∂{out}/∂input",
            "source",
        ]
        parts.append('<table style="border-collapse:collapse;font-family:monospace">')
        parts.append("<tr>" + "".join(f"<th>{e(h)}</th>" for h in heads) + "</tr>")
        style = ' style="border-top:1px solid #ccc;padding:2px 8px;vertical-align:top"'

        def cell(lines: Sequence[str]) -> str:
            return f"<td{style}>" + "<br>".join(e(s) for s in lines) + "</td>"

        for r in self.rows:
            local = [_local_text(r.name, x) for x in r.edges]
            sent = [" ".join(_sent_cell(out, r, x)) for x in r.edges]
            cells = [
                [r.name],
                [r.expr],
                _cell(r.value),
                _cell(r.upstream),
                local,
                sent,
                [r.source or ""],
            ]
            parts.append("<tr>" + "".join(cell(c) for c in cells) + "</tr>")
        parts.append("</table><p>")
        grads = [f"∂{out}/∂{r.name} = {_short(r.upstream)}" for r in self.inputs]
        parts.append("<br>".join(f"gradient: {e(g)}" for g in grads))
        parts.append("</p>")
        if self.nan_report:
            parts.append(f'<pre style="color:#b00">NaN provenance: {e(self.nan_report)}</pre>')
        parts.append("</div>")
        return "\n".join(parts)

    # --- Graphviz ---------------------------------------------------------------

    def to_dot(self) -> str:
        """The graph in Graphviz DOT: inputs, operations, and on each edge the
        local derivative and the gradient sent back along it."""
        out = self.output
        ids = {r.name: f"n{i}" for i, r in enumerate(reversed(self.rows))}
        for i, (name, _) in enumerate(self.constants):
            ids[name] = f"c{i}"
        lines = [
            "digraph explain {",
            "  rankdir=LR;",
            '  node [fontname="Helvetica", fontsize=11];',
            '  edge [fontname="Helvetica", fontsize=9];',
        ]
        used_consts = {c for names in self._const_edges.values() for c in names}
        for name, value in self.constants:
            if name in used_consts:
                label = f"{name} = {_short(value)}\\n(constant)"
                style = "shape=ellipse, style=dashed, color=gray"
                lines.append(f'  {ids[name]} [{style}, label="{_dq(label)}"];')
        for r in reversed(self.rows):
            grad = f"∂{out}/∂{r.name} = {_short(r.upstream)}"
            if r.op == "input":
                label = f"{r.name} = {_short(r.value)}\\n{grad}"
                lines.append(
                    f'  {ids[r.name]} [shape=ellipse, style=filled, fillcolor="#e8f0fe", '
                    f'label="{_dq(label)}"];'
                )
            else:
                label = f"{r.name} = {r.expr}\\n= {_short(r.value)}\\n{grad}"
                lines.append(f'  {ids[r.name]} [shape=box, label="{_dq(label)}"];')
        for r in reversed(self.rows):
            for c in self._const_edges.get(r.name, ()):
                lines.append(f"  {ids[c]} -> {ids[r.name]} [style=dashed, color=gray];")
            for x in r.edges:
                label = f"{_local_text(r.name, x)}\\n∂{out}/∂{x.input} += {_short(x.gradient)}"
                lines.append(f'  {ids[x.input]} -> {ids[r.name]} [label="{_dq(label)}"];')
        lines.append("}")
        return "\n".join(lines) + "\n"

    def to_svg(self) -> str:
        """The graph rendered by Graphviz as SVG text (needs the `dot` program)."""
        return _run_dot(self.to_dot(), "svg").decode("utf-8")

    def save(self, path: str | os.PathLike) -> None:
        """Writes the graph: `.dot`/`.gv` as DOT text; `.svg`, `.png`, `.pdf` via Graphviz."""
        path = os.fspath(path)
        ext = os.path.splitext(path)[1].lower().lstrip(".")
        if ext in ("dot", "gv"):
            data = self.to_dot().encode("utf-8")
        elif ext in ("svg", "png", "pdf"):
            data = _run_dot(self.to_dot(), ext)
        else:
            raise ValueError(
                f"Explanation.save: cannot tell the format of {path!r} from its extension. "
                "Use .dot or .gv (DOT text), or .svg, .png, .pdf (rendered with Graphviz)."
            )
        with open(path, "wb") as f:
            f.write(data)


def _run_dot(dot: str, fmt: str) -> bytes:
    exe = shutil.which("dot")
    if exe is None:
        raise GraphvizNotFoundError(
            f"Rendering the graph as {fmt.upper()} needs Graphviz's `dot` program, which is "
            "not on PATH. Install Graphviz (apt-get install graphviz, brew install graphviz, "
            "or conda install graphviz), or save the DOT text instead: "
            "explanation.save('graph.dot') / explanation.to_dot()."
        )
    done = subprocess.run([exe, f"-T{fmt}"], input=dot.encode("utf-8"), capture_output=True)
    if done.returncode != 0:
        raise RuntimeError(f"Graphviz failed: {done.stderr.decode(errors='replace')}")
    return done.stdout


# --- explain -------------------------------------------------------------------------


def explain(
    fun: Callable,
    *args: Any,
    argnums: int | Sequence[int] = 0,
    names: Mapping[str, str] | Sequence[str | None] | None = None,
) -> Explanation:
    """Runs `fun(*args)` and its backward pass, and returns the chain-rule table.

    The same function you give to `cr.grad` (written with `jax.numpy`,
    `jax.nn`, `lax` or `chainrule.numpy`), at one concrete point. `explain`
    runs eagerly: call it outside `jax.jit`/`jax.vmap`.

    Args:
      fun: a function returning a real scalar (a loss).
      *args: the point; differentiated arguments are float arrays or pytrees.
      argnums: the argument(s) to differentiate, as in `cr.grad`. The other
        float arguments are shown as constants; edges into them are not followed.
      names: renames nodes: a mapping from the default names (argument names,
        assigned variable names, `t1`, `t2`, ...) to yours, or a sequence with
        one name (or None to keep the default) per operation in forward order.

    Returns:
      An `Explanation`: `print` it, display it in a notebook, read `.rows`
      (backward order), `.grads` (as `cr.grad` returns them), or draw
      `.to_dot()` / `.save("graph.svg")`.

    Examples:
      >>> import chainrule as cr
      >>> e = cr.explain(lambda w, x, y: (w * x - y) ** 2, 1.0, 1.0, 2.0,
      ...                names=["y_hat", "s", "loss"])
      >>> [(r.name, r.expr, float(r.value)) for r in e.forward]
      [('y_hat', 'w · x', 1.0), ('s', 'y_hat - y', -1.0), ('loss', 's²', 1.0)]
      >>> e.row("loss").edges[0].formula, float(e.row("loss").edges[0].local)
      ('2·s', -2.0)
    """
    transforms._check_callable(fun, "cr.explain")
    argnums_t, single = transforms._normalize_argnums(argnums, "cr.explain")
    nums = transforms._resolve_argnums(argnums_t, len(args), "cr.explain")
    with host.evaluating():  # NaN/inf are shown (and explained), not warned about
        return _explain(fun, args, nums, single, names)


@dataclasses.dataclass
class _Tape:
    """What one eager run of the function recorded, and what the inputs are called."""

    out: Any
    trace: Any
    tracers: list
    trees: list
    input_names: dict[Node, str]
    constants: dict[Node, str]
    created: list[Node]
    sources: dict[Node, str | None]
    nan_report: str | None = None  # the first node whose cotangent became NaN/inf


def _record(fun, args, nums) -> _Tape:
    """Runs `fun` once on a chainrule trace, its float constants boxed too (so
    their edges can be shown), noting every node and the source line that made it."""
    input_names: dict[Node, str] = {}
    constants: dict[Node, str] = {}

    def box_constants(trace, boxed):
        trace.taps = debugging.TapSink()  # so that cr.tap marks its node (shown by name)
        for i, arg in enumerate(args):
            if i in nums:
                continue
            with_path, tree = jax.tree_util.tree_flatten_with_path(arg)
            leaves = []
            for path, leaf in with_path:
                if _is_float(leaf):
                    leaf = trace.new_input(jax.numpy.asarray(leaf))
                    constants[leaf.node] = _leaf_name(fun, i, path)
                leaves.append(leaf)
            boxed[i] = jax.tree_util.tree_unflatten(tree, leaves)

    created: list[Node] = []
    sources: dict[Node, str | None] = {}

    def record(node: Node, where: str | None) -> None:
        created.append(node)
        sources[node] = where

    with core.recording(record):
        trace, out, tracers, trees = transforms.trace_call(
            fun, args, nums, "cr.explain", prepare=box_constants
        )
    for i, leaves in zip(nums, tracers, strict=True):
        for path, t in zip(_paths(args[i]), leaves, strict=True):
            input_names[t.node] = _leaf_name(fun, i, path)
    _shorten(input_names, constants)
    return _Tape(out, trace, tracers, trees, input_names, constants, created, sources)


def _backward(tape: _Tape) -> tuple[dict[Node, Any], dict[Node, list[Any]], list[Node], dict]:
    """The backward pass (`core.backward`), keeping what every node received and sent."""
    upstream: dict[Node, Any] = {}
    sent: dict[Node, list[Any]] = {}
    order: list[Node] = []

    def observe(node: Node, g: Any, cts: Sequence[Any] | None) -> None:
        order.append(node)
        upstream[node] = g
        if cts is not None:
            sent[node] = list(cts)
            if not tape.nan_report and node.prim is not None:
                tape.nan_report = debugging.nonfinite_report(node, tape.sources.get(node), g, cts)

    out = tape.out
    input_cts: dict = {}
    if isinstance(out, Tracer) and out._trace is tape.trace:
        one = np.ones((), raw(out).dtype)
        input_cts = core.backward([(out.node, one)], release=False, observe=observe)
    return upstream, sent, order, input_cts


def _shown_nodes(tape: _Tape, order: list[Node]):
    """The nodes on a path from the output to a differentiated input, in creation
    order; a single-output projection (of a custom_jvp function) shown as its source."""
    reached = set(order)
    relevant: set[Node] = set(tape.input_names)
    for node in reversed(order):
        if any(p in relevant for p in node.parents):
            relevant.add(node)
    key_of = {m: _display(m) for m in reached}
    proj_of = {key_of[m]: m for m in reached if key_of[m] is not m}
    shown = {key_of[m] for m in relevant} - set(tape.input_names) - set(tape.constants)
    ops: list[Node] = []
    for n in dict.fromkeys(tape.created):
        if n in shown:
            ops.append(n)
        multi = [m for m in shown if _projects(m, n)]  # outputs of a multiple-results node
        ops.extend(sorted(multi, key=lambda m: m.prim.index))
    return ops, key_of, proj_of, relevant, shown


def _names(tape: _Tape, ops: list[Node], key_of: dict, fun_name: str, names: Any) -> dict:
    """Yours, else the assigned variable on the source line, else t1, t2, ..."""
    name_of: dict[Node, str] = {**tape.input_names, **tape.constants}
    out = tape.out
    out_key = key_of.get(out.node) if isinstance(out, Tracer) else None
    auto = _assigned_names(ops, tape.sources)
    used = set(name_of.values())
    counter = 0
    for n in ops:
        name = _tap_name(n) or auto.get(n)
        if name is None and n is out_key:
            name = fun_name if fun_name.isidentifier() else "out"
        if name is None:
            counter += 1
            while f"t{counter}" in used:
                counter += 1
            name = f"t{counter}"
        name_of[n] = _unique(name, used)
        used.add(name_of[n])
    _rename(name_of, names, ops)
    return name_of


def _rows(tape, ops, key_of, proj_of, relevant, shown, name_of, upstream, sent):
    """The table: one row per shown node (output first), then the inputs; and
    which constants feed which node."""
    constants = tape.constants

    def operand(node: Node, i: int) -> str:
        if i in node.argnums:
            parent = node.parents[node.argnums.index(i)]
            return name_of.get(key_of.get(parent, parent), "?")
        return _short(node.primals[i], const=True)

    rows: list[Row] = []
    const_edges: dict[str, list[str]] = {}
    for n in reversed(ops):
        g = upstream.get(proj_of.get(n, n))
        value = n.ans[0] if n in proj_of else n.ans
        operands = [operand(n, i) for i in range(len(n.primals))]
        if n.prim.name == "projection":  # one output of a node with several
            operands = [name_of.get(key_of.get(n.parents[0], n.parents[0]), "?")]
        edges = []
        locals_ = _local_derivatives(n, value)
        for k, (i, parent) in enumerate(zip(n.argnums, n.parents, strict=True)):
            target = key_of.get(parent, parent)
            if target in constants:
                const_edges.setdefault(name_of[n], []).append(name_of[target])
            if target not in relevant and target not in shown:
                continue
            cts = sent.get(n)
            edges.append(
                Edge(
                    input=name_of[target],
                    formula=_formula(n, i, operands, name_of[n]),
                    local=None if locals_ is None else _np(locals_[k]),
                    gradient=None if cts is None else _np(cts[k]),
                )
            )
        rows.append(
            Row(
                name=name_of[n],
                op=_op_name(n),
                expr=_expr(n, operands),
                source=tape.sources.get(n, tape.sources.get(n.parents[0]) if n.parents else None),
                value=_np(value),
                upstream=_np(g),
                edges=tuple(edges),
            )
        )
    for node in tape.input_names:
        g = upstream.get(node)
        rows.append(
            Row(
                name_of[node],
                "input",
                "input",
                None,
                _np(node.ans),
                _np(g) if g is not None else np.zeros_like(_np(node.ans)),
            )
        )
    return rows, const_edges


def _explain(fun, args, nums, single, names) -> Explanation:
    fun_name = getattr(fun, "__name__", "function")
    tape = _record(fun, args, nums)
    out = tape.out
    transforms._check_scalar(out, f"cr.explain of {fun_name}")
    if isinstance(raw(out), jax.core.Tracer):
        raise TypeError(
            "cr.explain shows concrete numbers, so it runs eagerly; it was called under a JAX "
            "transformation (jax.jit, jax.vmap, ...). Call it outside, on concrete arguments."
        )
    upstream, sent, order, input_cts = _backward(tape)
    grads = transforms.gradients(tape.tracers, tape.trees, input_cts)
    grads = grads[0] if single else grads
    ops, key_of, proj_of, relevant, shown = _shown_nodes(tape, order)
    name_of = _names(tape, ops, key_of, fun_name, names)
    rows, const_edges = _rows(tape, ops, key_of, proj_of, relevant, shown, name_of, upstream, sent)
    out_key = key_of.get(out.node) if isinstance(out, Tracer) else None
    return Explanation(
        fun_name=fun_name,
        output=name_of.get(out_key, fun_name) if out_key is not None else fun_name,
        value=_np(raw(out)),
        grads=grads,
        rows=rows,
        constants=[(name, _np(node.ans)) for node, name in tape.constants.items()],
        differentiated=[name_of[n] for n in tape.input_names],
        edges_in=const_edges,
        nan_report=tape.nan_report,
    )


def _display(node: Node) -> Node:
    prim = node.prim
    if prim is not None and prim.name == "projection" and getattr(prim, "count", 0) == 1:
        return node.parents[0]
    return node


def _projects(m: Node, n: Node) -> bool:
    return m.prim is not None and m.prim.name == "projection" and m.parents[0] is n


def _is_float(x: Any) -> bool:
    if isinstance(x, bool):
        return False
    if isinstance(x, float):
        return True
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.numpy.issubdtype(dtype, jax.numpy.floating)


class _Outputs(tuple):
    """The values (or cotangents) of a node with several outputs; each output has
    its own row below it, so the node's cell only counts them."""


def _np(x: Any) -> Any:
    if isinstance(x, (tuple, list)):  # the values or cotangents of a multiple-results node
        present = [v for v in x if v is not None]
        if len(x) == 1 or (isinstance(x, tuple) and len(present) == 1):
            return _np(present[0]) if present else None  # one output's (a projection's)
        return _Outputs(_np(v) for v in x)
    if x is None:
        return None
    return np.asarray(raw(x))


# --- names ---------------------------------------------------------------------------


def _paths(arg: Any) -> list[Any]:
    return [p for p, _ in jax.tree_util.tree_flatten_with_path(arg)[0]]


def _leaf_name(fun: Callable, i: int, path: Any) -> str:
    try:
        params = list(inspect.signature(fun).parameters.values())
    except (TypeError, ValueError):
        params = []
    if i < len(params) and params[i].kind in (
        params[i].POSITIONAL_ONLY,
        params[i].POSITIONAL_OR_KEYWORD,
    ):
        base = params[i].name
    else:
        base = f"arg{i}"
    return base + (jax.tree_util.keystr(path) if path else "")


def _shorten(*tables: dict[Node, str]) -> None:
    """`params['w1']` becomes `w1` when no other input ends in the same key."""
    short = {}
    for table in tables:
        for node, name in table.items():
            m = re.fullmatch(r"[A-Za-z_]\w*(?:\[[^\]]*\])*\['([A-Za-z_]\w*)'\]", name)
            if m:
                short[node] = m.group(1)
    base = {name.split("[")[0] for t in tables for name in t.values()}
    counts: dict[str, int] = {}
    for s in short.values():
        counts[s] = counts.get(s, 0) + 1
    for table in tables:
        for node in table:
            s = short.get(node)
            if s is not None and counts[s] == 1 and s not in base:
                table[node] = s


_ASSIGN = re.compile(r"\s*([A-Za-z_]\w*)\s*(?::[^=]*)?=(?!=)")
_WHERE = re.compile(r"^(?P<file>.*?):(?P<line>\d+)(?::\d+)? \((?P<fun>[^()]*)\)$")


def _split_source(where: str | None) -> tuple[str, int] | None:
    m = _WHERE.match(where or "")
    return (m.group("file"), int(m.group("line"))) if m else None


def _code(where: str | None) -> str:
    loc = _split_source(where)
    return linecache.getline(*loc).strip() if loc else ""


def _loc(where: str | None) -> str:
    """`file.py:12` (`cell:12` in a notebook) for a source line."""
    loc = _split_source(where)
    if loc is None:
        return where or ""
    file, line = loc
    if "ipykernel_" in file or file.startswith("<ipython"):
        return f"cell:{line}"
    return f"{os.path.basename(file)}:{line}"


def _assigned_names(ops: list[Node], sources: dict[Node, str | None]) -> dict[Node, str]:
    """The last node of each run of nodes made on `name = ...` line gets `name`."""
    names = {}
    for k, n in enumerate(ops):
        loc = _split_source(sources.get(n))
        if loc is None:
            continue
        nxt = _split_source(sources.get(ops[k + 1])) if k + 1 < len(ops) else None
        if nxt == loc:
            continue
        m = _ASSIGN.match(linecache.getline(*loc))
        if m and m.group(1) not in ("return", "lambda"):
            names[n] = m.group(1)
    return names


def _unique(name: str, used: set[str]) -> str:
    if name not in used:
        return name
    k = 2
    while f"{name}_{k}" in used:
        k += 1
    return f"{name}_{k}"


def _rename(name_of: dict[Node, str], names: Any, ops: list[Node]) -> None:
    if names is None:
        return
    if isinstance(names, Mapping):
        known = set(name_of.values())
        unknown = [k for k in names if k not in known]
        if unknown:
            raise ValueError(
                f"cr.explain: names={dict(names)!r} renames {unknown}, which are not nodes of "
                f"this function; the nodes are {sorted(known)}."
            )
        for node, name in name_of.items():
            name_of[node] = names.get(name, name)
        return
    names = list(names)
    if len(names) > len(ops):
        raise ValueError(
            f"cr.explain: names has {len(names)} entries but the function has {len(ops)} "
            f"operations ({[name_of[n] for n in ops]}). Give one name (or None) per operation "
            "in forward order, or a mapping {default name: your name}."
        )
    for node, name in zip(ops, names, strict=False):
        if name:
            name_of[node] = name


# --- operations: how to write them and their local derivatives ----------------------

_SUP = str.maketrans("0123456789-", "⁰¹²³⁴⁵⁶⁷⁸⁹⁻")

_INFIX = {"add": "+", "add_any": "+", "sub": "-", "mul": "·", "div": "/"}
_FUNC = {"logistic": "σ", "neg": "-"}

# Local derivatives d(out)/d(input_i) come from the rule table: each elementwise
# rule's `formulas` (see `rules.defvjp` for the syntax), rendered in the operands'
# names. tests/test_formulas.py checks every formula against its rule.
_OPERANDS = ("x", "y", "z")

# The custom_jvp functions of `jax.nn` that explain names, with the local
# derivative their JVP rule gives, in the same syntax. `_formula` shows one only
# where it agrees with the rule that ran (a user's own `relu` may differ), and
# tests/test_formulas.py checks them against chainrule's gradient.
_CUSTOM_JVP_FORMULAS = {
    "relu": ("where(x > 0, 1, 0)",),
    "relu6": ("where((x > 0) & (x < 6), 1, 0)",),
}


def _evaluate_formula(
    formula: str, operands: Sequence[Any], out: Any, params: Mapping[str, Any] | None = None
) -> Any:
    """A formula's value with NumPy: `x`, `y`, `z` are the operands, `out` the output."""
    code = compile(formula, "<formula>", "eval")
    env = {name: getattr(np, name) for name in code.co_names if hasattr(np, name)}
    special = FORMULA_FUNCTIONS  # special functions (digamma, ...) beyond NumPy's
    env.update((name, special[name]) for name in code.co_names if name in special)
    env.update(params or {})
    env.update(zip(_OPERANDS, operands, strict=False))
    env["out"] = out
    with np.errstate(all="ignore"):
        return eval(code, {"__builtins__": {}}, env)


# Precedences of the rendered text: a part below its context's level is parenthesized.
_COND, _LOGIC, _CMP, _ADD, _MUL, _UNARY, _POW, _ATOM = range(8)
_BINARY = {
    ast.Add: ("+", _ADD),
    ast.Sub: ("-", _ADD),
    ast.Mult: ("·", _MUL),
    ast.Div: ("/", _MUL),
    ast.BitAnd: (" ∧ ", _LOGIC),
    ast.BitOr: (" ∨ ", _LOGIC),
}
_COMPARE = {ast.Gt: ">", ast.GtE: "≥", ast.Lt: "<", ast.LtE: "≤", ast.Eq: "=", ast.NotEq: "≠"}
_REVERSED = {">": "<", "≥": "≤", "<": ">", "≤": "≥", "=": "=", "≠": "≠"}


def _render_formula(formula: str, ops: Sequence[str], out: str, params: Mapping) -> str:
    """A formula for reading: operands and output by their names in the table,
    number parameters substituted and simplified (integer_pow's `3·x²`), `·` for
    `*`, superscript powers, `√`, `|x|`, and `1[x>0]` for `where(x > 0, 1, 0)`."""
    names = dict(zip(_OPERANDS, ops, strict=False))
    names["out"] = out
    numbers = {k: v for k, v in params.items() if _is_number(v)}
    tree = _simplify(ast.parse(formula, mode="eval").body, numbers)
    return _show(tree, names, params)[0]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _num_value(node: ast.AST) -> Any:
    """The number a node stands for, or None."""
    if isinstance(node, ast.Constant) and _is_number(node.value):
        return node.value
    return None


def _simplify(node: ast.AST, numbers: Mapping[str, Any]) -> ast.AST:
    """Substitutes number parameters, then folds what they make constant:
    integer arithmetic, comparisons, `e**1`, `e**0`, `1·e`, `0·e`, `where(True, a, b)`."""
    if isinstance(node, ast.Name) and node.id in numbers:
        v = numbers[node.id]
        return ast.Constant(v.item() if isinstance(v, np.generic) else v)
    if isinstance(node, ast.UnaryOp):
        operand = _simplify(node.operand, numbers)
        v = _num_value(operand)
        if isinstance(node.op, ast.USub) and v is not None:
            return ast.Constant(-v)
        return ast.UnaryOp(node.op, operand)
    if isinstance(node, ast.BinOp):
        a, b = _simplify(node.left, numbers), _simplify(node.right, numbers)
        va, vb, op = _num_value(a), _num_value(b), type(node.op)
        if isinstance(va, int) and isinstance(vb, int) and op in (ast.Add, ast.Sub, ast.Mult):
            return ast.Constant({ast.Add: va + vb, ast.Sub: va - vb, ast.Mult: va * vb}[op])
        if op is ast.Mult and 0 in (va, vb):
            return ast.Constant(0)
        if op is ast.Mult and (va == 1 or vb == 1):
            return b if va == 1 else a
        if op is ast.Mult and va == -1:
            return ast.UnaryOp(ast.USub(), b)
        if op is ast.Pow and vb in (0, 1):
            return ast.Constant(1) if vb == 0 else a
        if op in (ast.Add, ast.Sub) and vb == 0:
            return a
        return ast.BinOp(a, node.op, b)
    if isinstance(node, ast.Compare):
        parts = [_simplify(p, numbers) for p in (node.left, *node.comparators)]
        folded = ast.Compare(parts[0], node.ops, parts[1:])
        if all(_num_value(p) is not None for p in parts):
            return ast.Constant(bool(_evaluate_formula(ast.unparse(folded), (), None)))
        return folded
    if isinstance(node, ast.Call):
        args = [_simplify(a, numbers) for a in node.args]
        name = getattr(node.func, "id", None)
        if name == "where" and len(args) == 3 and isinstance(getattr(args[0], "value", None), bool):
            return args[1] if args[0].value else args[2]
        return ast.Call(node.func, args, [])
    return node


def _wrap(part: tuple[str, int], level: int) -> str:
    text, prec = part
    return f"({text})" if prec < level else text


def _is_atom(text: str) -> bool:
    """An operand's name or value needs no parentheses: `w1`, `params['w1']`, `2`, `[1, 2]`."""
    bare = re.sub(r"\[[^\]]*\]", "", text)
    return bare == "" or re.fullmatch(r"[^\s+\-*/·^()<>=≤≥≠|,]+", bare) is not None


def _show(node: ast.AST, names: Mapping[str, str], params: Mapping) -> tuple[str, int]:
    """Text and precedence of a simplified formula."""
    show = lambda n: _show(n, names, params)
    if isinstance(node, ast.Constant):
        v = node.value
        text = str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)
        return text, _UNARY if text.startswith("-") else _ATOM
    if isinstance(node, ast.Name):
        if node.id in names:
            text = names[node.id]
            if re.fullmatch(r"-[\d.]+(e[+-]?\d+)?", text):  # a negative constant operand
                return text, _UNARY
            return text, _ATOM if _is_atom(text) else _COND
        if node.id in params:
            return str(params[node.id]), _ATOM
        return ("π" if node.id == "pi" else node.id), _ATOM
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return "-" + _wrap(show(node.operand), _UNARY), _UNARY
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        base, power = _wrap(show(node.left), _ATOM), _num_value(node.right)
        if isinstance(power, int):
            return base + str(power).translate(_SUP), _POW
        return f"{base}^{_wrap(show(node.right), _ATOM)}", _POW
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        sign, prec = _BINARY[type(node.op)]
        chain = _chained(node, names, params)
        if chain is not None:
            return chain, _CMP
        left = _wrap(show(node.left), prec)
        right = show(node.right)
        tight = isinstance(node.op, (ast.Sub, ast.Div))  # a-(b-c), a/(b·c)
        level = _ATOM if right[0].startswith("-") else prec + 1 if tight else prec
        return left + sign + _wrap(right, level), prec
    if isinstance(node, ast.Compare) and len(node.ops) == 1:
        a, b = (_wrap(show(p), _ADD) for p in (node.left, node.comparators[0]))
        return f"{a}{_COMPARE[type(node.ops[0])]}{b}", _CMP
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        name, args = node.func.id, node.args
        if name == "where" and len(args) == 3:
            cond, yes, no = (show(a) for a in args)
            if (_num_value(args[1]), _num_value(args[2])) == (1, 0):
                return f"1[{cond[0]}]", _ATOM
            return f"{_wrap(yes, _LOGIC)} if {_wrap(cond, _LOGIC)} else {no[0]}", _COND
        if name == "sqrt" and len(args) == 1:
            return "√" + _wrap(show(args[0]), _ATOM), _UNARY
        if name == "abs" and len(args) == 1:
            return f"|{show(args[0])[0]}|", _ATOM
        return f"{name}({', '.join(show(a)[0] for a in args)})", _ATOM
    return ast.unparse(node), _COND


def _chained(node: ast.BinOp, names: Mapping[str, str], params: Mapping) -> str | None:
    """`(x > 0) & (x < 6)` as `0<x<6`, when two comparisons share their middle term."""
    if not isinstance(node.op, ast.BitAnd):
        return None
    parts = []
    for c in (node.left, node.right):
        if not (isinstance(c, ast.Compare) and len(c.ops) == 1):
            return None
        a, b = (_wrap(_show(p, names, params), _ADD) for p in (c.left, c.comparators[0]))
        op = _COMPARE[type(c.ops[0])]
        parts.append((a, op, b) if op in "<≤" else (b, _REVERSED[op], a) if op in ">≥" else None)
    if None in parts or parts[0][2] != parts[1][0]:
        return None
    (a, op1, b), (_, op2, c) = parts
    return f"{a}{op1}{b}{op2}{c}"


def _tap_name(node: Node) -> str | None:
    """A `cr.tap(x, name)` node is shown under its name (leaf i of a pytree as name[i])."""
    if node.prim is None or node.prim.name != "tap" or node.params["name"] is None:
        return None
    leaves = node.params["sink"].trees[node.params["name"]].num_leaves
    return node.params["name"] + (f"[{node.params['index']}]" if leaves > 1 else "")


def _op_name(node: Node) -> str:
    name = node.prim.name
    if name in ("custom_jvp_call", "custom_vjp_call"):
        return _custom_name(node.params) or name.removesuffix("_call")
    return name


def _custom_name(params: dict) -> str | None:
    """The name of the function a custom_jvp/custom_vjp node stands for."""
    debug = getattr(params.get("fun"), "debug_info", None)
    name = getattr(debug, "func_name", None)
    return None if name in (None, "<lambda>", "<unknown>") else str(name)


def _shape(x: Any) -> str:
    return "[" + ",".join(str(d) for d in np.shape(x)) + "]"


def _is_matmul(node: Node) -> bool:
    (lc, rc), (lb, rb) = node.params["dimension_numbers"]
    ranks = [np.ndim(raw(p)) for p in node.primals]
    return not lb and not rb and tuple(lc) == (ranks[0] - 1,) and tuple(rc) == (0,)


def _expr(node: Node, ops: list[str]) -> str:
    name, params = node.prim.name, node.params
    if name in _INFIX and len(ops) == 2:
        return f"{ops[0]} {_INFIX[name]} {ops[1]}"
    if name == "projection":
        return f"{ops[0]}[{node.prim.index}]"
    if name == "integer_pow":
        return f"{ops[0]}{str(params['y']).translate(_SUP)}"
    if name == "square":
        return f"{ops[0]}²"
    if name == "neg":
        return f"-{ops[0]}"
    if name == "dot_general":
        return f"{ops[0]} @ {ops[1]}" if _is_matmul(node) else f"dot({ops[0]}, {ops[1]})"
    if name == "transpose":
        perm = tuple(params["permutation"])
        return f"{ops[0]}ᵀ" if perm == (1, 0) else f"transpose({ops[0]}, {perm})"
    if name == "broadcast_in_dim":
        return f"broadcast({ops[0]}, {_shape(node.ans)})"
    if name in ("reshape", "squeeze"):
        return f"reshape({ops[0]}, {_shape(node.ans)})"
    if name in ("reduce_sum", "reduce_max", "reduce_min"):
        f = name.removeprefix("reduce_")
        axes = tuple(params["axes"])
        full = len(axes) == np.ndim(raw(node.primals[0]))
        return f"{f}({ops[0]})" if full else f"{f}({ops[0]}, axes={axes})"
    if name == "convert_element_type":
        return f"{_dtype(params['new_dtype'])}({ops[0]})"
    if name == "select_n":
        return f"select({', '.join(ops)})"
    op = _FUNC.get(name) or _op_name(node)
    return f"{op}({', '.join(ops)})"


def _formula(node: Node, i: int, ops: list[str], out: str) -> str:
    """The local derivative of `node` with respect to its operand `i`, for reading:
    the rule's formula (elementwise rules), else what the rule does to ḡ."""
    name, params = _op_name(node), node.params
    formulas = getattr(node.prim, "formulas", None)
    if formulas is not None and i < len(formulas) and formulas[i] is not None:
        return _render_formula(formulas[i], ops, out, params)
    if node.prim.name == "custom_jvp_call" and _custom_jvp_formula_holds(node, name, i):
        return _render_formula(_CUSTOM_JVP_FORMULAS[name][i], ops, out, {})
    if name == "dot_general":
        if _is_matmul(node):
            return f"{_G} ↦ {_G} @ {ops[1]}ᵀ" if i == 0 else f"{_G} ↦ {ops[0]}ᵀ @ {_G}"
        return f"{_G} ↦ contract {_G} with {ops[1 - i]}"
    if name == "transpose":
        return f"{_G} ↦ {_G}ᵀ" if tuple(params["permutation"]) == (1, 0) else "transpose back"
    if name == "broadcast_in_dim":
        return f"{_G} ↦ sum {_G} to {_shape(raw(node.primals[0]))}"
    if name in ("reshape", "squeeze", "expand_dims"):
        return f"{_G} ↦ reshape {_G} to {_shape(raw(node.primals[0]))}"
    if name == "reduce_sum":
        return f"{_G} ↦ broadcast {_G} to {_shape(raw(node.primals[0]))}"
    if name in ("reduce_max", "reduce_min", "argmax"):
        return f"{_G} ↦ {_G} at the {name.removeprefix('reduce_')}"
    if name == "select_n":
        return f"1[{ops[0]}={i - 1}]"
    if name == "projection":
        return f"{_G} ↦ cotangent of output {node.prim.index}"
    if name == "tap":
        return f"{_G} ↦ hook({_G})" if node.params["hook"] is not None else "1"
    if node.prim.name == "custom_jvp_call":
        return f"{_G} ↦ {name}'s custom_jvp rule"
    if node.prim.name == "custom_vjp_call":
        return f"{_G} ↦ {name}'s bwd rule"
    return f"{_G} ↦ {name} rule"


def _local_derivatives(node: Node, value: Any) -> list[Any] | None:
    """d(out)/d(input) for scalar nodes: pull a cotangent of 1 back through the node."""
    if isinstance(value, (list, tuple)) or any(i >= len(node.primals) for i in node.argnums):
        return None  # a node with several outputs, or one of those outputs
    if np.ndim(raw(value)) != 0 or any(np.ndim(raw(node.primals[i])) for i in node.argnums):
        return None
    one = lax.full((), 1, raw(value).dtype)
    try:
        return list(node.vjp((one,) if getattr(node.prim, "multiple_results", False) else one))
    except Exception:  # a rule that needs more than one cotangent: show the formula only
        return None


def _custom_jvp_formula_holds(node: Node, name: str, i: int) -> bool:
    """Whether `_CUSTOM_JVP_FORMULAS[name][i]` is what this node's rule computes:
    its value against the rule's VJP of ones (the derivative, for an elementwise
    function)."""
    formulas = _CUSTOM_JVP_FORMULAS.get(name, ())
    if i >= len(formulas) or i not in node.argnums or len(node.ans) != 1:
        return False
    out = np.asarray(raw(node.ans[0]))
    try:
        want = _evaluate_formula(formulas[i], [np.asarray(raw(p)) for p in node.primals], out)
        got = node.vjp((lax.full(out.shape, 1, out.dtype),))[node.argnums.index(i)]
    except Exception:  # a function of another signature: show the rule generically
        return False
    if got is None or np.shape(got) != out.shape:
        return False
    return bool(np.allclose(_np(got), want, rtol=1e-6, atol=0, equal_nan=True))


def _local_text(name: str, e: Edge) -> str:
    if _G in e.formula:
        return f"∂{name}/∂{e.input}: {e.formula}"
    text = f"∂{name}/∂{e.input} = {e.formula}"
    if e.local is not None and _short(e.local) != e.formula:
        if " if " in e.formula:  # a piecewise formula, then its value
            text = f"∂{name}/∂{e.input} = ({e.formula})"
        text += f" = {_short(e.local)}"
    return text


def _sent_cell(out: str, r: Row, e: Edge) -> list[str]:
    lhs = f"∂{out}/∂{e.input} "
    if e.gradient is None:
        return [lhs + "= 0 (no dependence)"]
    with np.errstate(invalid="ignore"):  # 0 × inf is shown as the NaN it makes
        chained = (
            e.local is not None
            and np.ndim(r.upstream) == 0
            and np.ndim(e.gradient) == 0
            # a custom rule need not be linear
            and np.isclose(r.upstream * e.local, e.gradient, equal_nan=True)
        )
    if chained:
        return [f"{lhs}= {_short(r.upstream)} × {_short(e.local)} = {_short(e.gradient)}"]
    cell = _cell(e.gradient)
    return [lhs + "= " + cell[0], *cell[1:]]


# --- numbers ---------------------------------------------------------------------------


def _dtype(dtype: Any) -> str:
    d = np.dtype(dtype)
    return {"f": "f", "i": "i", "u": "u", "b": "bool", "c": "c"}.get(d.kind, d.kind) + (
        str(8 * d.itemsize) if d.kind != "b" else ""
    )


def _num(v: float, digits: int = 6) -> str:
    """`digits` significant digits, positional unless very large or small: 631, 0.0023."""
    v = float(v)
    if v == 0 or 1e-4 <= abs(v) < 1e6:
        s = np.format_float_positional(v, precision=digits, fractional=False, trim="-")
    else:
        s = f"{v:.{digits}g}"
    return "0" if s == "-0" else s


def _short(x: Any, const: bool = False) -> str:
    """A scalar exactly, a small array in full, a large one as dtype[shape] and its norm."""
    if x is None:
        return "0"
    if isinstance(x, _Outputs):
        return f"({len(x)} outputs)"
    x = np.asarray(raw(x))
    if x.ndim == 0:
        return _num(x) if x.dtype.kind in "fc" else str(x)
    if x.size <= 4:
        return "[" + ", ".join(_num(v) for v in x.reshape(-1)) + "]"
    head = f"{_dtype(x.dtype)}{_shape(x)}"
    return head if const else f"{head} ‖‖ {_num(np.linalg.norm(x), 3)}"


def _cell(x: Any) -> list[str]:
    """A value as the lines of a table cell: scalars exactly, arrays summarised."""
    if x is None:
        return ["0"]
    if isinstance(x, _Outputs):
        return [_short(x)]
    x = np.asarray(raw(x))
    if x.ndim == 0 or x.size <= 4:
        return [_short(x)]
    if x.dtype.kind not in "fc":
        return [f"{_dtype(x.dtype)}{_shape(x)}"]
    xf = x.astype(np.float64)
    return [
        f"{_dtype(x.dtype)}{_shape(x)}",
        f"‖‖ {_num(np.linalg.norm(xf), 3)}",
        f"μ {_num(xf.mean(), 3)}",
        f"[{_num(xf.min(), 2)}, {_num(xf.max(), 2)}]",
    ]


def _dq(s: str) -> str:
    """Escapes a DOT label (keeps the \\n line breaks written by the caller)."""
    return s.replace('"', '\\"')


# --- text layout -------------------------------------------------------------------------


def _clip(line: str, width: int) -> str:
    return line if len(line) <= width else line[: width - 1] + "…"


def _wrap_line(line: str, width: int) -> str:
    return "\n".join(textwrap.wrap(line, width, subsequent_indent="  ")) or line


def _table(header: list[list[str]], rows: list[list[list[str]]], width: int) -> list[str]:
    """Lays out cells (lists of lines) in columns; wraps the widest columns to fit."""
    n = len(header)
    gap = 2
    head = header
    natural = [max(len(line) for r in [head, *rows] for line in r[c] or [""]) for c in range(n)]
    widths = list(natural)
    hard = [max(6, *(len(w) for line in header[c] for w in line.split())) for c in range(n)]
    soft = [max(hard[c], min(natural[c], 16)) for c in range(n)]
    budget = width - gap * (n - 1) - 2
    # Shrink the widest columns first; array summaries (<= 16 wide) wrap only if need be.
    for minimum in (soft, hard):
        while sum(widths) > budget:
            c = max(range(n), key=lambda k: widths[k] - minimum[k])
            if widths[c] <= minimum[c]:
                break
            widths[c] -= 1

    def wrap(lines: list[str], w: int) -> list[str]:
        out = []
        for line in lines:
            out.extend(textwrap.wrap(line, w, break_on_hyphens=False) or [""])
        return out

    result = []
    for r in [head, None, *rows]:
        if r is None:
            result.append("  " + (" " * gap).join("─" * w for w in widths).rstrip())
            continue
        cells = [wrap(r[c], widths[c]) for c in range(n)]
        height = max(len(c) for c in cells)
        for j in range(height):
            parts = [(cells[c][j] if j < len(cells[c]) else "").ljust(widths[c]) for c in range(n)]
            result.append(("  " + (" " * gap).join(parts)).rstrip())
    return result
