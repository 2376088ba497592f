"""The AMX convolution kernels (conv_impl='amx'): accuracy, gradients, determinism,
sharding, routing and fallback.

Kernel tests skip (saying why) on machines without AMX or g++; the fallback and
routing-without-kernel tests run everywhere. Inputs are activations of real photos
(scikit-learn's china.jpg and flower.jpg through a fixed 1x1 projection and a ReLU),
so values are non-negative and spatially correlated as in a real network.
"""
import hashlib
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_sample_images

from conftest import REPO, run_with_devices
from deeper_jax.models import amx_conv, resolve_conv_impl
from deeper_jax.models.conv import Conv2D

HIGHEST = jax.lax.Precision.HIGHEST


@pytest.fixture
def kernels():
  why = amx_conv.unavailable_reason()
  if why:
    pytest.skip(f"AMX conv kernels unavailable: {why}")


def photo_activations(b, h, w, c, seed=0):
  """[b, h, w, c] float32: crops of real photos lifted to c channels (ReLU'd)."""
  photos = load_sample_images().images
  rng = np.random.default_rng(seed)
  crops = []
  for i in range(b):
    img = photos[i % 2]
    y, x = rng.integers(0, img.shape[0] - h), rng.integers(0, img.shape[1] - w)
    crops.append(img[y:y + h, x:x + w].astype(np.float32) / 255.0)
  lift = rng.standard_normal((3, c)).astype(np.float32)
  return np.maximum(np.stack(crops) @ lift - 0.3 * lift.sum(0), 0.0)


def he_kernel(k, c, n, seed=1):
  return (np.random.default_rng(seed).standard_normal((k, k, c, n))
          * np.sqrt(2.0 / (k * k * n))).astype(np.float32)


def xla_conv(x, kernel, padding):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((padding, padding),) * 2,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      precision=HIGHEST)


def bound(d):
  """Elementwise error bound of a bf16x3 sum of d products, times sum |a||b|
  (the derivation of clustering/amx_dot.relative_error)."""
  d32 = -(-d // 32) * 32
  return 3.1 * 2.0**-16 + (3 * d32 + 4) * 2.0**-24


# Channels off the 32-wide tiles, 5x5 and VALID convs, single images, a 1x1 image,
# widths that split 16-row tiles across image rows, and a VGG-sized 512-channel layer.
SHAPES = [  # (b, h, w, c, n, k, padding)
    (2, 9, 7, 16, 40, 3, 1),
    (3, 14, 14, 64, 64, 3, 1),
    (1, 5, 6, 33, 17, 3, 0),
    (2, 12, 12, 20, 48, 5, 2),
    (1, 1, 1, 24, 8, 3, 1),
    (2, 7, 7, 512, 512, 3, 1),
    (4, 30, 29, 48, 96, 3, 1),
]


@pytest.mark.parametrize("b,h,w,c,n,k,p", SHAPES)
def test_forward_and_both_gradients_are_within_the_bf16x3_bound(kernels, b, h, w, c, n, k, p):
  x = jnp.asarray(photo_activations(b, h, w, c))
  kernel = jnp.asarray(he_kernel(k, c, n))
  y_ref = xla_conv(x, kernel, p)
  dy = jnp.asarray(photo_activations(*y_ref.shape, seed=2) - 0.5)

  y, vjp = jax.vjp(lambda x_, k_: amx_conv.amx_conv(x_, k_, p), x, kernel)
  dx, dk = jax.jit(vjp)(dy)
  _, ref_vjp = jax.vjp(lambda x_, k_: xla_conv(x_, k_, p), x, kernel)
  dx_ref, dk_ref = ref_vjp(dy)
  # The same products with |a| and |b|: what each output's error scales with.
  _, abs_vjp = jax.vjp(lambda x_, k_: xla_conv(x_, k_, p), jnp.abs(x), jnp.abs(kernel))
  dx_scale, dk_scale = abs_vjp(jnp.abs(dy))
  y_scale = xla_conv(jnp.abs(x), jnp.abs(kernel), p)

  checks = [("forward", y, y_ref, y_scale, k * k * c),
            ("input gradient", dx, dx_ref, dx_scale, k * k * n),
            ("kernel gradient", dk, dk_ref, dk_scale, b * y_ref.shape[1] * y_ref.shape[2])]
  for name, got, ref, scale, depth in checks:
    assert got.shape == ref.shape and got.dtype == jnp.float32, name
    err = np.abs(np.asarray(got, np.float64) - np.asarray(ref, np.float64))
    scale = np.asarray(scale, np.float64)
    assert np.all(err <= bound(depth) * scale + 1e-30), name
    # Far better than plain bf16 (2^-8): the hi/lo split does its job everywhere.
    assert np.max(err / np.maximum(scale, 1e-30)) < 2.0**-14, name


def test_gradients_through_a_network_match_xla(kernels):
  """Two convs with a nonlinearity between: the custom VJP chains like XLA's."""
  x = jnp.asarray(photo_activations(2, 16, 16, 16))
  k1, k2 = jnp.asarray(he_kernel(3, 16, 32)), jnp.asarray(he_kernel(3, 32, 24, seed=3))

  def loss(conv, x, k1, k2):
    return jnp.sum(jnp.tanh(conv(jax.nn.relu(conv(x, k1, 1)), k2, 1)) ** 2)

  got = jax.jit(jax.grad(lambda *a: loss(amx_conv.amx_conv, *a), argnums=(0, 1, 2)))(x, k1, k2)
  ref = jax.grad(lambda *a: loss(xla_conv, *a), argnums=(0, 1, 2))(x, k1, k2)
  for g, r in zip(got, ref):
    np.testing.assert_allclose(g, r, rtol=2e-3, atol=2e-4 * float(jnp.max(jnp.abs(r))))


def test_same_bits_run_to_run(kernels):
  x = jnp.asarray(photo_activations(3, 20, 20, 64))
  kernel = jnp.asarray(he_kernel(3, 64, 64))
  f = jax.jit(jax.value_and_grad(lambda x_, k_: jnp.sum(amx_conv.amx_conv(x_, k_, 1) ** 2),
                                 argnums=(0, 1)))
  first, second = f(x, kernel), f(x, kernel)
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
    np.testing.assert_array_equal(a, b)


THREADS_CODE = """
import hashlib, os, sys
os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:{cpus}]))
sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
import jax, jax.numpy as jnp, numpy as np
from deeper_jax.models import amx_conv
from test_amx_conv import photo_activations, he_kernel
# 112 x 112 x 64: the kernel gradient sums over several q stripes.
x = jnp.asarray(photo_activations(2, 112, 112, 64)); k = jnp.asarray(he_kernel(3, 64, 64))
y, vjp = jax.vjp(lambda a, b: amx_conv.amx_conv(a, b, 1), x, k)
dx, dk = jax.jit(vjp)(jnp.asarray(photo_activations(2, 112, 112, 64, seed=2)))
print(hashlib.sha256(b"".join(np.asarray(a).tobytes() for a in (y, dx, dk))).hexdigest())
"""


def test_results_do_not_depend_on_the_thread_count(kernels):
  """Work items own disjoint outputs and stripes are a function of the shape only."""
  if len(os.sched_getaffinity(0)) < 2:
    pytest.skip("needs at least 2 CPUs")
  digests = []
  for cpus in (1, 2):
    code = THREADS_CODE.format(cpus=cpus, repo=REPO, tests=os.path.dirname(__file__))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    digests.append(proc.stdout.strip().splitlines()[-1])
  assert digests[0] == digests[1]


def test_batch_sharded_on_8_devices_each_device_convolves_its_own_images(kernels):
  result = run_with_devices(f"""
    import json, sys
    sys.path.insert(0, {os.path.dirname(__file__)!r})
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from deeper_jax.models import amx_conv
    from test_amx_conv import photo_activations, he_kernel
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("super", "data"))
    x = jnp.asarray(photo_activations(16, 14, 14, 32)); k = jnp.asarray(he_kernel(3, 32, 48))
    f = jax.jit(jax.value_and_grad(
        lambda a, b: jnp.sum(jnp.tanh(amx_conv.amx_conv(a, b, 1))), argnums=(0, 1)))
    xs = jax.device_put(x, NamedSharding(mesh, P(("super", "data"))))
    one, eight = f(x, k), f(xs, k)
    hlo = f.lower(xs, k).compile().as_text()
    y = jax.jit(lambda a, b: amx_conv.amx_conv(a, b, 1))(xs, k)
    print(json.dumps({{
        "dx_equal": bool(jnp.all(one[1][0] == eight[1][0])),
        "dk_rel": float(jnp.max(jnp.abs(one[1][1] - eight[1][1])) / jnp.max(jnp.abs(one[1][1]))),
        "loss_rel": float(abs(one[0] - eight[0]) / abs(one[0])),
        "gathers": hlo.count("all-gather"), "reduces": hlo.count("all-reduce"),
        "y_spec": str(y.sharding.spec), "local_rows": y.addressable_shards[0].data.shape[0]}}))
  """)
  assert result["dx_equal"]  # images are convolved alone: the same bits on any split
  assert result["dk_rel"] < 1e-5 and result["loss_rel"] < 1e-5
  assert result["gathers"] == 0 and result["reduces"] >= 1  # dK is psum'd, x never gathered
  assert result["local_rows"] == 2 and "super" in result["y_spec"]


def test_conv2d_routes_stride1_wide_convs_to_the_kernels(kernels):
  def targets(layer, x):
    variables = layer.init(jax.random.key(0), x)
    hlo = jax.jit(layer.apply).lower(variables, x).as_text()
    return "deeper_jax_amx_conv" in hlo, variables

  x16, x3 = jnp.ones((2, 8, 8, 16)), jnp.ones((2, 8, 8, 3))
  assert targets(Conv2D(8, 3, padding=1, conv_impl="amx"), x16)[0]
  assert not targets(Conv2D(8, 3, padding=1, conv_impl="amx"), x3)[0]        # RGB / Sobel input
  assert not targets(Conv2D(8, 3, stride=2, padding=1, conv_impl="amx"), x16)[0]
  assert not targets(Conv2D(8, 3, padding=1, conv_impl="amx", dtype=jnp.bfloat16), x16)[0]
  layer = Conv2D(8, 3, padding=1, conv_impl="amx")
  x = jnp.asarray(photo_activations(2, 8, 8, 16))
  variables = layer.init(jax.random.key(0), x)
  reference = Conv2D(8, 3, padding=1, conv_impl="xla").apply(variables, x)
  np.testing.assert_allclose(layer.apply(variables, x), reference, rtol=1e-4, atol=1e-5)
  assert resolve_conv_impl("auto") == ("amx" if jax.default_backend() == "cpu" else "xla")


def test_unsupported_arguments_are_refused_before_any_kernel_runs():
  x, kernel = jnp.ones((1, 8, 8, 16)), jnp.ones((3, 3, 16, 8))
  with pytest.raises(ValueError, match="padding 0..k-1 = 2, got 3"):
    amx_conv.amx_conv(x, kernel, 3)
  with pytest.raises(ValueError, match="kernel has 16 input channels, x has 4"):
    amx_conv.amx_conv(jnp.ones((1, 8, 8, 4)), kernel, 1)
  with pytest.raises(ValueError, match="square kernel"):
    amx_conv.amx_conv(x, jnp.ones((3, 1, 16, 8)), 0)


def test_auto_falls_back_to_hybrid_and_explicit_amx_explains(monkeypatch):
  monkeypatch.setattr(amx_conv, "unavailable_reason", lambda: "this CPU lacks amx_tile")
  if jax.default_backend() == "cpu":
    assert resolve_conv_impl("auto") == "hybrid"
  with pytest.raises(ValueError, match=r"conv_impl='amx' is not available: .*use 'auto'"):
    resolve_conv_impl("amx")
