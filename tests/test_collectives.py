"""`jax.shard_map` losses and their collectives (`chainrule.engine.rules.collectives`)
on 1, 2 and 4 simulated CPU devices, against `jax.vjp` / `jax.grad`.

The number of devices must be set before JAX starts, so each device count runs
this file as a script in a subprocess (`jax_num_cpu_devices`, and
`XLA_FLAGS=--xla_force_host_platform_device_count`): a few cases per count by
default, together covering every collective, and every case on every count in
the slow run. The script runs each case through the oracle under `jit` (values
and first order; also eager and second order for the data-parallel loss on 4
devices, and second order for the ring: compile time stays bounded) and prints
one line per case, `ok <name> <primitives>` or `FAIL <name>: <error>`.

Cases: data parallel (`pvary`, `psum_invariant`, `pmean`), tensor parallel
(`all_gather` of a column-sharded layer, `reduce_scatter`), a ring (`ppermute`),
`all_to_all`, `all_gather_invariant`, `pmax`/`pmin` (which `jax.grad` cannot
differentiate: checked against the same loss written with `all_gather` and
`jnp.max`, whose rule splits ties the same way), `check_vma=False` (`psum`),
a 2-D mesh, closed-over constants, and float32.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Each device count runs a few cases by default (together they cover every
# collective); the slow run runs every case on every device count.
BOUNDED = {
    1: ["data_parallel", "no_check_vma", "closed_over"],
    2: ["data_parallel_float32", "tensor_parallel", "ring", "pmax_pmin"],
    4: [
        "data_parallel",
        "reduce_scatter",
        "all_to_all",
        "all_gather_invariant",
        "mesh_2d",
        "explicit_mesh",
    ],
}
EVERY_COLLECTIVE = {
    "shard_map", "pvary", "psum_invariant", "psum", "all_gather", "reduce_scatter",
    "ppermute", "all_to_all", "all_gather_invariant", "pmax", "pmin",
}  # fmt: skip


def _run(devices: int, cases: list[str]) -> set[str]:
    """Runs `cases` on `devices` CPU devices in a subprocess; the primitives they emit."""
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "src"), ROOT]),
        JAX_PLATFORMS="cpu",
    )
    run = subprocess.run(
        [sys.executable, os.path.abspath(__file__), str(devices), *cases],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    lines = run.stdout.splitlines()
    failed = [line for line in lines if line.startswith("FAIL")]
    assert run.returncode == 0 and not failed, "\n".join(failed) + run.stderr[-3000:]
    passed = {line.split()[1] for line in lines if line.startswith("ok ")}
    assert passed == set(cases), (passed, run.stderr[-3000:])
    return {p for line in lines if line.startswith("ok ") for p in line.split()[2].split(",")}


def test_bounded_cases_cover_every_case_and_collective():
    assert set(_case_names()) == {c for cases in BOUNDED.values() for c in cases}


@pytest.mark.parametrize("devices", sorted(BOUNDED))
def test_shard_map_losses_match_jax(devices):
    _run(devices, BOUNDED[devices])


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 2, 4])
def test_every_case_on_every_device_count(devices):
    emitted = _run(devices, _case_names())
    assert EVERY_COLLECTIVE <= emitted, EVERY_COLLECTIVE - emitted


def _case_names():
    return [
        "data_parallel",
        "data_parallel_float32",
        "tensor_parallel",
        "reduce_scatter",
        "ring",
        "all_to_all",
        "all_gather_invariant",
        "pmax_pmin",
        "no_check_vma",
        "mesh_2d",
        "closed_over",
        "explicit_mesh",
    ]


# --- the script run in the subprocess ----------------------------------------------------------


def _cases(n):  # pragma: no cover (runs in the subprocess)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax
    from jax._src.lax.parallel import all_gather_invariant as gather_invariant  # (not in jax.lax)
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:n]), ("i",))
    smap = lambda f, i, o, **k: jax.shard_map(f, mesh=mesh, in_specs=i, out_specs=o, **k)  # noqa: E731
    rng = np.random.default_rng(n)
    x = jnp.asarray(rng.normal(size=(4 * n, 3)))
    w = jnp.asarray(rng.normal(size=(3, 2 * n)) / 2)

    def data_parallel(w, x):
        def body(w, x):
            h = jnp.tanh(x @ w)
            return lax.pmean(jnp.mean(h**2), "i") + lax.psum(jnp.sum(h), "i")

        return smap(body, (P(), P("i")), P())(w, x)

    def tensor_parallel(w, x):
        def body(w, x):  # w's columns sharded; the activations gathered
            h = jnp.tanh(x @ w)
            full = lax.all_gather(h, "i", axis=1, tiled=True)
            return jnp.sin(full)

        return jnp.sum(smap(body, (P(None, "i"), P()), P("i"))(w, x) ** 2)

    def reduce_scatter(w, x):
        def body(w, x):
            h = jnp.tanh(x @ w)  # (4n, 2) per shard
            part = lax.psum_scatter(h, "i", scatter_dimension=0, tiled=True)
            return jnp.cos(part)

        return jnp.sum(smap(body, (P(None, "i"), P()), P("i"))(w, x) * x[:, :1] ** 2)

    def ring(w, x):
        perm = [(k, (k + 1) % n) for k in range(n)]

        def body(w, x):
            h = jnp.tanh(x @ w)
            return h * lax.ppermute(h, "i", perm) + lax.ppermute(jnp.sin(h), "i", perm[::-1])

        return jnp.sum(smap(body, (P(), P("i")), P("i"))(w, x) ** 2)

    def all_to_all(w, x):
        def body(w, x):  # (4, 2n) per shard -> (4n, 2)
            h = jnp.tanh(x @ w)
            return jnp.sin(lax.all_to_all(h, "i", split_axis=1, concat_axis=0, tiled=True))

        return jnp.sum(smap(body, (P(), P("i")), P("i"))(w, x) ** 2)

    def all_gather_invariant(w, x):
        def body(w, x):
            h = jnp.tanh(x @ w)
            full = gather_invariant(h, "i", axis=0, tiled=True)
            return jnp.sum(jnp.sin(full) * full)

        return smap(body, (P(), P("i")), P())(w, x)

    def pmax_pmin(w, x):
        def body(w, x):
            h = jnp.tanh(x @ w)
            return lax.pmax(h, "i") * 2.0 + lax.pmin(jnp.sin(h), "i")

        return jnp.sum(smap(body, (P(), P("i")), P())(w, x) ** 2)

    def pmax_pmin_reference(w, x):  # what pmax_pmin computes, as JAX can differentiate it
        def body(w, x):
            h = jnp.tanh(x @ w)
            hs = gather_invariant(h, "i")
            return jnp.max(hs, 0) * 2.0 + jnp.min(jnp.sin(hs), 0)

        return jnp.sum(smap(body, (P(), P("i")), P())(w, x) ** 2)

    def no_check_vma(w, x):
        def body(w, x):
            h = jnp.tanh(x @ w)
            return lax.psum(jnp.sum(h**2), "i") + jnp.sum(w**2)

        return smap(body, (P(), P("i")), P(), check_vma=False)(w, x)

    def mesh_2d(w, x):
        if n < 4:
            devices = np.array(jax.devices()[:n]).reshape(n, 1)
        else:
            devices = np.array(jax.devices()[:4]).reshape(2, 2)
        mesh2 = Mesh(devices, ("d", "m"))

        def body(w, x):  # data parallel over d, the layer's columns over m
            h = jnp.tanh(x @ w)
            full = lax.all_gather(h, "m", axis=1, tiled=True)
            return lax.psum(jnp.sum(full**2), ("d", "m"))

        specs = (P(None, "m"), P("d"))
        return jax.shard_map(body, mesh=mesh2, in_specs=specs, out_specs=P())(w, x)

    table = jnp.asarray(rng.normal(size=(3,)))

    def closed_over(w, x):
        def body(x):  # w and a constant closed over
            return lax.psum(jnp.sum(jnp.sin(x @ w) * table[:2].sum()), "i")

        return smap(body, (P("i"),), P())(x)

    # an explicit mesh: the inputs' sharding is part of their type, and shard_map
    # checks it against in_specs (eagerly too), and its cotangents' (the sum's)
    explicit = jax.make_mesh((n,), ("i",), axis_types=(jax.sharding.AxisType.Explicit,))
    on_explicit = jax.sharding.NamedSharding(explicit, P("i"))

    def explicit_mesh(w, x):
        def body(w, x):
            h = jnp.tanh(x @ w)
            return jnp.sin(h) * lax.psum(jnp.sum(h), "i")

        out = jax.shard_map(body, mesh=explicit, in_specs=(P(), P("i")), out_specs=P("i"))(w, x)
        return jnp.sum(out**2)

    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    return {
        "data_parallel": (data_parallel, (w, x), None),
        "data_parallel_float32": (data_parallel, (f32(w), f32(x)), None),
        "tensor_parallel": (tensor_parallel, (w, x), None),
        "reduce_scatter": (reduce_scatter, (w, x), None),
        "ring": (ring, (w, x), None),
        "all_to_all": (all_to_all, (w, x), None),
        "all_gather_invariant": (all_gather_invariant, (w, x), None),
        "pmax_pmin": (pmax_pmin, (w, x), pmax_pmin_reference),
        "no_check_vma": (no_check_vma, (w, x), None),
        "mesh_2d": (mesh_2d, (w, x), None),
        "closed_over": (closed_over, (w, x), None),
        "explicit_mesh": (explicit_mesh, (w, jax.device_put(x, on_explicit)), None),
    }


def _main(n, only=()):  # pragma: no cover (runs in the subprocess)
    import jax

    jax.config.update("jax_num_cpu_devices", n)
    jax.config.update("jax_enable_x64", True)
    import numpy as np

    import chainrule as cr
    from tests.oracle import check_against_jax, emitted

    assert len(jax.devices()) >= n, jax.devices()
    failures = 0
    for name, (loss, args, reference) in _cases(n).items():
        if only and name not in only:
            continue
        # (the explicit mesh's inputs compute under it, as JAX requires)
        explicit = name == "explicit_mesh"
        placed = jax.set_mesh(args[1].sharding.mesh) if explicit else contextlib.nullcontext()
        with placed:
            try:
                names = emitted(loss, *args)
                if reference is None:  # (all of it for one case: the rest is compile time)
                    full = (name == "data_parallel" and n == 4) or name == "explicit_mesh"
                    modes = ("eager", "jit") if full else ("jit",)
                    check_against_jax(loss, *args, modes=modes, second_order=full or name == "ring")
                    if name == "explicit_mesh":  # the gradient of a sum: cotangents of ones
                        for grad in (cr.grad(loss, (0, 1)), jax.jit(cr.grad(loss, (0, 1)))):
                            got, want = grad(*args), jax.grad(loss, (0, 1))(*args)
                            for g, v in zip(got, want, strict=True):
                                np.testing.assert_allclose(g, v, rtol=1e-12, atol=1e-12)
                else:  # JAX cannot differentiate it: compare with the reference's gradient
                    want = jax.grad(reference, (0, 1))(*args)
                    got = jax.jit(cr.grad(loss, (0, 1)))(*args)
                    for g, v in zip(got, want, strict=True):
                        np.testing.assert_allclose(g, v, rtol=1e-12, atol=1e-12)
                print(f"ok {name} {','.join(sorted(names))}", flush=True)
            except Exception as e:  # noqa: BLE001 (reported to the test)
                failures += 1
                print(f"FAIL {name}: {type(e).__name__}: {e}".replace("\n", " | "), flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":  # pragma: no cover
    _main(int(sys.argv[1]), sys.argv[2:])
