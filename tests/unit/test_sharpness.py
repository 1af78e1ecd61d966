"""Power iteration on Hessian-vector products finds a quadratic's known top eigenvalue."""

import pytest
import torch

from tvlars_scale.paper.sharpness import hessian_vector_product, top_hessian_eigenvalue


def quadratic(eigenvalues: list[float], seed: int = 0):
    """loss(x) = x^T A x / 2 over parameters split into a 2-D and a 1-D tensor; A = Q diag Q^T."""
    generator = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    a = q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T
    matrix = torch.randn(2, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    vector = torch.randn(n - 6, generator=generator, dtype=torch.float64, requires_grad=True)

    def loss():
        x = torch.cat([matrix.reshape(-1), vector])
        return 0.5 * x @ a @ x

    return a, [matrix, vector], loss


def test_hessian_vector_product_is_a_times_v():
    a, params, loss = quadratic([5.0, 3.0, 2.0, 1.0, 0.5, 0.25, 0.1, 0.0])
    v = torch.randn(8, dtype=torch.float64)
    product = hessian_vector_product(loss, params, [v[:6].reshape(2, 3), v[6:]])
    torch.testing.assert_close(torch.cat([product[0].reshape(-1), product[1]]), a @ v)


@pytest.mark.parametrize("top", [7.5, 40.0])
def test_top_eigenvalue_of_a_quadratic(top):
    eigenvalues = [top, 3.0, 2.0, 1.0, 0.5, 0.25, 0.1, -0.2, 0.0, 1.5]
    _, params, loss = quadratic(eigenvalues, seed=1)
    rng_before = torch.get_rng_state()
    eigen = top_hessian_eigenvalue(loss, params, max_iterations=200, rtol=1e-10)
    assert eigen.converged and eigen.iterations < 200
    assert eigen.value == pytest.approx(top, rel=1e-6)
    assert torch.equal(torch.get_rng_state(), rng_before)  # its own generator


def test_stops_at_max_iterations_without_converging():
    # Two nearly equal top eigenvalues: power iteration converges slowly.
    _, params, loss = quadratic([4.0, 3.999, 1.0, 0.5, 0.1, 0.2, 0.3, 0.4], seed=2)
    eigen = top_hessian_eigenvalue(loss, params, max_iterations=3, rtol=1e-12)
    assert eigen.iterations == 3 and not eigen.converged
    assert 3.0 < eigen.value <= 4.0 + 1e-9  # a Rayleigh quotient: never above the top
