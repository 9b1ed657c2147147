"""Backend dispatch of the selective scan: argument, context manager, environment variable, fallbacks."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from lkm_unet.ops import available_backends, scan_backend, selective_scan, selective_scan_ref
from lkm_unet.ops import selective_scan_backends as backends

# the package re-exports the function under the module's name, so fetch the module itself
dispatch = importlib.import_module("lkm_unet.ops.selective_scan")


@pytest.fixture
def spies(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records which implementation each ``selective_scan`` call ran (fast backends: their forward)."""
    calls: list[str] = []
    load = backends.module

    def module_spy(name: str):
        calls.append(name)
        return load(name)

    def ref_spy(*args, **kwargs):
        calls.append("ref")
        return selective_scan_ref(*args, **kwargs)

    monkeypatch.setattr(backends, "module", module_spy)
    monkeypatch.setattr(dispatch, "selective_scan_ref", ref_spy)
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setattr(dispatch, "_warned", set())
    return calls


def small_args() -> list[torch.Tensor]:
    """u, delta, A, B, C, D, z, delta_bias for b = 1, d = 2, l = 5, n = 3."""
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, 2, 5, generator=g), torch.rand(1, 2, 5, generator=g), -torch.rand(2, 3, generator=g) - 0.1,
            torch.randn(1, 3, 5, generator=g), torch.randn(1, 3, 5, generator=g), torch.randn(2, generator=g),
            torch.randn(1, 2, 5, generator=g), torch.rand(2, generator=g)]


def test_env_var_context_and_argument_select_backend(spies: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    args = small_args()
    cpu_auto = dispatch.resolve_backend("auto", torch.device("cpu"))  # numba when it is there, else torch
    selective_scan(*args)
    monkeypatch.setenv(dispatch.ENV_VAR, "ref")
    y_ref = selective_scan(*args)
    with scan_backend("torch"):
        y_torch = selective_scan(*args)  # the context manager beats the environment
        selective_scan(*args, backend="ref")  # an explicit argument beats both
    selective_scan(*args, backend="torch")
    monkeypatch.setenv(dispatch.ENV_VAR, " Torch ")
    selective_scan(*args)
    assert spies == [cpu_auto, "ref", "torch", "ref", "torch", "torch"]
    torch.testing.assert_close(y_torch, y_ref, rtol=6e-4, atol=2e-3)  # fp32 tolerance of the oracle tests


def test_invalid_backend_names_raise_with_the_valid_names(spies: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    valid = "auto, cuda, triton, numba, torch, ref"
    with pytest.raises(ValueError, match=f"backend='mamba_ssm'.*valid: {valid}"):
        selective_scan(*small_args(), backend="mamba_ssm")
    with pytest.raises(ValueError, match=f"scan_backend='fast'.*valid: {valid}"):
        with scan_backend("fast"):
            pass
    monkeypatch.setenv(dispatch.ENV_VAR, "mamba")
    with pytest.raises(ValueError, match=f"{dispatch.ENV_VAR}='mamba'.*valid: {valid}"):
        selective_scan(*small_args())
    assert spies == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback for tensors that are not on CUDA")
def test_cuda_backend_on_cpu_tensors_falls_back_to_torch_warning_once(spies: list[str]) -> None:
    args = small_args()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        selective_scan(*args, backend="cuda")
        selective_scan(*args, backend="cuda")
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    cpu_auto = dispatch.resolve_backend("auto", torch.device("cpu"))
    assert len(runtime) == 1, [str(w.message) for w in runtime]
    assert str(runtime[0].message).startswith("selective_scan: backend 'cuda' cannot run on cpu tensors here "
                                              "(cuda: it computes on cuda tensors, these are cpu tensors); "
                                              f"using the {cpu_auto} backend")
    assert spies == [cpu_auto, cpu_auto]


def test_available_backends_reports_why_cuda_is_unusable() -> None:
    backends = available_backends()
    assert backends["torch"] == backends["ref"] == "ok"
    if torch.cuda.is_available():
        pytest.skip("the reason depends on the local mamba-ssm build")
    assert backends["cuda"].startswith("torch sees no CUDA device")
    assert "pip install" not in backends["cuda"]          # no kernel build helps without a GPU
    try:
        import mamba_ssm  # noqa: F401
    except ImportError:
        assert "mamba-ssm is not installed" in backends["cuda"]


def test_import_and_cpu_scan_without_mamba_ssm_or_triton() -> None:
    """A fresh interpreter in which mamba_ssm, triton and the CUDA extensions cannot be imported."""
    script = textwrap.dedent("""
        import sys
        BLOCKED = ("mamba_ssm", "triton", "selective_scan_cuda", "causal_conv1d")
        for name in BLOCKED:
            sys.modules[name] = None  # makes `import name` raise ModuleNotFoundError
        import torch
        from lkm_unet.ops import available_backends, selective_scan
        x = torch.randn(1, 2, 5)
        y = selective_scan(x, x, -torch.ones(2, 3), torch.randn(1, 3, 5), torch.randn(1, 3, 5))
        assert y.shape == (1, 2, 5) and bool(torch.isfinite(y).all())
        assert available_backends()["cuda"] != "ok"
        print(sorted(m for m, v in sys.modules.items() if m.split(".")[0] in BLOCKED and v is not None))
    """)
    root = Path(dispatch.__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != dispatch.ENV_VAR}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_available_backends_names_every_backend_with_a_reason() -> None:
    backends_now = available_backends()
    assert list(backends_now) == ["torch", "ref", "cuda", "triton", "numba"]
    if not torch.cuda.is_available():
        assert backends_now["triton"].startswith("torch sees no CUDA device")


@pytest.mark.parametrize("torch_cuda,triton_installed", [(None, True), ("12.4", True), (None, False)])
def test_available_backends_says_why_triton_is_unusable_without_a_gpu(
        monkeypatch: pytest.MonkeyPatch, torch_cuda: str, triton_installed: bool) -> None:
    """No CUDA device: the triton line names the cause (CPU-only torch, or a CUDA torch that finds no GPU)
    and whether triton itself is there; no install hint, since no install helps without a GPU."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device: the triton line is its self-test's result")
    monkeypatch.setattr(torch.version, "cuda", torch_cuda)
    monkeypatch.setattr(backends, "installed", lambda module: triton_installed if module == "triton" else False)
    monkeypatch.setattr(backends, "_version", lambda dist: "3.9.0")
    cause = (f"this torch {torch.__version__} is a CPU-only build" if torch_cuda is None else
             "this torch is built for CUDA 12.4 but finds no GPU: check the driver (nvidia-smi) and "
             "CUDA_VISIBLE_DEVICES")
    if triton_installed:
        want = (f"torch sees no CUDA device ({cause}); triton 3.9.0 is installed, its kernels need a CUDA GPU "
                "(TRITON_INTERPRET=1 runs them on CPU tensors, slowly, for tests)")
    else:
        want = f"torch sees no CUDA device and triton is not installed ({cause})"
    assert backends.report("triton") == want
    assert available_backends()["triton"] == want


@pytest.mark.parametrize("usable,expected", [({"cuda", "triton"}, "cuda"), ({"triton"}, "triton"), (set(), "torch")])
def test_auto_order_on_cuda_tensors_and_the_line_that_says_why(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, usable: set, expected: str) -> None:
    """cuda, else triton, else torch; the reasons of the skipped backends are in one line."""
    monkeypatch.setattr(backends, "status", lambda name, device: "ok" if name in usable | {"torch"} else f"no {name}")
    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level("WARNING", logger="lkm_unet"):
        warnings.simplefilter("always")
        for _ in range(2):
            assert dispatch.resolve_backend("auto", torch.device("cuda")) == expected
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] + \
        [r.getMessage() for r in caplog.records]
    if expected == "cuda":
        assert messages == []
    elif expected == "triton":
        assert messages == ["selective_scan: using the triton backend on CUDA because cuda: no cuda"]
    else:
        assert len(messages) == 1
        assert messages[0].startswith("selective_scan: using the torch backend on CUDA because cuda: no cuda; "
                                      "triton: no triton; for a faster scan")


def test_forced_backend_that_cannot_run_falls_back_along_the_auto_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends, "status", lambda name, device: "ok" if name in ("triton", "torch") else f"no {name}")
    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.warns(RuntimeWarning, match=r"backend 'cuda' cannot run on cuda tensors here \(cuda: no cuda\); "
                                            r"using the triton backend"):
        assert dispatch.resolve_backend("auto", torch.device("cuda")) == "triton"
    assert dispatch.resolve_backend("triton", torch.device("cuda")) == "triton"


def test_import_lkm_unet_imports_neither_triton_nor_dynamo() -> None:
    """Triton, numba and torch._dynamo (which imports triton) load only when a backend or compile needs them."""
    script = "import sys, lkm_unet; print(sorted(m for m in ('triton', 'numba', 'torch._dynamo') if m in sys.modules))"
    root = Path(dispatch.__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != dispatch.ENV_VAR}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("backend", ["torch", "numba", "ref"])
def test_wrong_shapes_name_the_argument_and_the_shape_it_needs(backend: str) -> None:
    """Every backend gets the same check before it runs: the argument at fault, the shape it needs (from u
    and A) and the shape it got; an empty sequence is refused instead of failing inside a kernel."""
    b, d, l, n = 2, 4, 6, 3
    good = {"u": torch.randn(b, d, l), "delta": torch.rand(b, d, l), "A": -torch.rand(d, n),
            "B": torch.randn(b, n, l), "C": torch.randn(b, n, l), "D": torch.randn(d), "z": torch.randn(b, d, l),
            "delta_bias": torch.randn(d)}

    def call(**changed: torch.Tensor) -> torch.Tensor:
        x = {**good, **changed}
        return selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], z=x["z"],
                              delta_bias=x["delta_bias"], backend=backend)

    assert call().shape == (b, d, l)
    cases = {
        "u": (torch.randn(b, d), "u must be (b, d, l) with l >= 1; got shape (2, 4)"),
        "A": (torch.randn(d + 1, n), "A must be (d, n) with d = 4 (u is (2, 4, 6)); got shape (5, 3)"),
        "B": (torch.randn(b, l, n), "B must be (2, 3, 6) (b, d, l = 2, 4, 6 from u, n = 3 from A); got shape (2, 6, 3)"),
        "delta": (torch.rand(b, d, l + 1), "delta must be (2, 4, 6) (b, d, l = 2, 4, 6 from u, n = 3 from A); "
                                           "got shape (2, 4, 7)"),
        "delta_bias": (torch.randn(d, 1), "delta_bias must be (4,) (b, d, l = 2, 4, 6 from u, n = 3 from A); "
                                          "got shape (4, 1)"),
    }
    for name, (bad, message) in cases.items():
        with pytest.raises(ValueError) as err:
            call(**{name: bad})
        assert str(err.value) == f"selective_scan: {message}", name
    empty = {k: v[..., :0] if v.dim() == 3 else v for k, v in good.items()}
    with pytest.raises(ValueError, match=r"^selective_scan: u must be \(b, d, l\) with l >= 1; got shape \(2, 4, 0\)$"):
        call(**empty)
