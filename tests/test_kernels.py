"""Block kernels against float64 math, and backend selection with fallback."""

import warnings

import pytest
import torch

from exactness import max_err
from hf_striped.log import reset_warnings
from hf_striped.kernels import KERNELS, select_kernel
from hf_striped.kernels.reference import plain_attention


def _inputs(dtype, b=2, s=9, h=6, hk=3, d=33, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, s, n, d, generator=g).to(dtype) for n in (h, hk, hk, h)]


@pytest.mark.parametrize("name", ["torch_cpu", "reference"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [True, False])
def test_cpu_kernels_against_float64_autograd(name, dtype, causal):
    q, k, v, do = _inputs(dtype)
    kern = KERNELS[name]
    scale = 0.2
    out, lse = kern.forward(q, k, v, causal, scale)
    dq, dk, dv = kern.backward(do, q, k, v, out, lse, causal, scale)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    out64, lse64 = plain_attention(q64, k64, v64, causal, scale)
    out64.backward(do.double())
    # bf16 inputs are exact in float64; both kernels compute them in float32 or better
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-5}[dtype]
    errs = dict(out=max_err(out, out64), lse=max_err(lse, lse64), dq=max_err(dq, q64.grad),
                dk=max_err(dk, k64.grad), dv=max_err(dv, v64.grad))
    print(name, dtype, causal, {k_: f"{e:.1e}" for k_, e in errs.items()})
    assert out.dtype in (dtype, torch.float32) and lse.dtype in (torch.float32, torch.float64)
    assert dk.shape == k.shape and dv.shape == v.shape
    assert max(errs.values()) < tol


def test_auto_picks_the_fused_cpu_kernel_silently():
    q, k, v, _ = _inputs(torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select_kernel("auto", q, k, v).name == "torch_cpu"


@pytest.mark.parametrize("backend", ["flash_attn", "torch_flash", "torch_efficient", "torch_cudnn"])
def test_named_backend_that_cannot_run_raises_and_names_auto(backend):
    """An explicitly named backend is a request: it is never silently replaced by another kernel."""
    q, k, v, _ = _inputs(torch.float32)
    with pytest.raises(ValueError, match=rf"backend '{backend}' cannot run these inputs.*backend='auto', which would pick 'torch_cpu'"):
        select_kernel(backend, q, k, v)


def test_auto_falls_back_along_the_chain_with_one_warning(monkeypatch):
    """``auto`` still passes over a kernel that refuses the inputs, with a one-time warning."""
    reset_warnings()
    q, k, v, _ = _inputs(torch.float32)
    monkeypatch.setattr(KERNELS["torch_cpu"], "unsupported_reason", lambda *a: "head_dim 12 is not supported")
    with pytest.warns(RuntimeWarning, match="falling back to the 'reference' attention kernel: torch_cpu rejected"):
        assert select_kernel("auto", q, k, v).name == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # second time: silent
        assert select_kernel("auto", q, k, v).name == "reference"


def test_unknown_backend_and_bad_gqa_shapes_are_errors():
    q, k, v, _ = _inputs(torch.float32)
    with pytest.raises(ValueError, match="unknown backend"):
        select_kernel("triton", q, k, v)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        select_kernel("auto", q[:, :, :5], k, v)


@pytest.mark.parametrize("backend", ["auto", "torch_cpu", "reference"])
def test_a_dtype_no_kernel_computes_is_a_type_error(backend):
    """float8 is a storage format: every CPU kernel refuses it, and the error says what to cast to."""
    q, k, v, _ = _inputs(torch.float32)
    q, k, v = (t.to(torch.float8_e4m3fn) for t in (q, k, v))
    with pytest.raises(TypeError, match=r"cast q/k/v to one of torch.bfloat16, torch.float16, torch.float32, torch.float64"):
        select_kernel(backend, q, k, v)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["torch_flash", "torch_efficient", "torch_cudnn", "flash_attn"])
@pytest.mark.parametrize("d", [64, 128])
def test_cuda_kernels_against_float64(name, d):
    kern = KERNELS[name]
    q, k, v, do = (t.cuda() for t in _inputs(torch.bfloat16, s=256, h=8, hk=2, d=d))
    reason = kern.unsupported_reason(q, k, v)
    if reason:
        pytest.skip(reason)
    for causal in (True, False):
        out, lse = kern.forward(q, k, v, causal, d**-0.5)
        dq, dk, dv = kern.backward(do, q, k, v, out, lse, causal, d**-0.5)
        q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
        out64, lse64 = plain_attention(q64, k64, v64, causal)
        out64.backward(do.double())
        qb, kb, vb = (t.detach().requires_grad_() for t in (q, k, v))
        outb, lseb = plain_attention(qb, kb, vb, causal)
        outb.backward(do)
        for ours, ref, base in ((out, out64, outb), (lse, lse64, lseb), (dq, q64.grad, qb.grad), (dk, k64.grad, kb.grad), (dv, v64.grad, vb.grad)):
            assert max_err(ours, ref) <= 2 * max_err(base, ref) + 1e-5


def test_flash_attn_parameter_names_survive_custom_op_wrapping():
    """flash-attn >= 2.7 wraps its internals in torch.library.custom_op, whose own signature is
    (*args, **kwargs); the adapter must still see the real parameter names."""
    from hf_striped.kernels.flash_attn import _params, _window_args

    @torch.library.custom_op("hf_striped_test::fake_fwd", mutates_args=())
    def fake_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, softmax_scale: float,
                 causal: bool, window_size_left: int, window_size_right: int, softcap: float,
                 alibi_slopes: torch.Tensor | None, return_softmax: bool) -> torch.Tensor:
        return q.clone()

    params = _params(fake_fwd)
    assert {"q", "softmax_scale", "window_size_left", "softcap"} <= params
    assert _window_args(params) == dict(window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None)
    args = dict(q=torch.ones(1), k=torch.ones(1), v=torch.ones(1), dropout_p=0.0, softmax_scale=1.0, causal=True,
                return_softmax=False, **_window_args(params))
    assert torch.equal(fake_fwd(**{key: val for key, val in args.items() if key in params}), torch.ones(1))
