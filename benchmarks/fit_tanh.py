"""Fit the rational tanh approximation used by charnn/kernels.py, and report its error.

    python benchmarks/fit_tanh.py

tanh(x) ~ x P(x^2) / Q(x^2) with P, Q of degree 4 and Q(0) = 1, fitted on 0 < x <= 9 (beyond 9,
float32 tanh is +-1) to minimise the maximum relative error: linearised least squares
(y Q(u) - x P(u) = 0) reweighted towards the worst points (Lawson's method), in the scaled
variable u = (x / 9)^2 to keep the system well conditioned. Prints the coefficients and the
maximum error of the approximation evaluated in float32 on |x| <= 12.
"""

import numpy

C = 9.0
DEG = 4


def fit(iters: int = 100):
    x = numpy.linspace(1e-6, C, 200001)
    y = numpy.tanh(x)
    u = (x / C) ** 2
    w = numpy.ones_like(x)
    best = None
    for _ in range(iters):
        A = numpy.hstack([x[:, None] * u[:, None] ** numpy.arange(DEG + 1),
                          -(y[:, None] * u[:, None] ** numpy.arange(1, DEG + 1))])
        weight = w / y
        coef, *_ = numpy.linalg.lstsq(A * weight[:, None], y * weight, rcond=None)
        p = coef[: DEG + 1]
        q = numpy.concatenate([[1.0], coef[DEG + 1:]])
        approx = x * numpy.polyval(p[::-1], u) / numpy.polyval(q[::-1], u)
        rel = numpy.abs(approx - y) / y
        if best is None or rel.max() < best[0]:
            best = (rel.max(), p, q)
        w = w * (1 + rel / rel.max()) ** 2
        w /= w.mean()
    err, p, q = best
    k = numpy.arange(DEG + 1)
    return err, p / C ** (2 * k), q / C ** (2 * k)  # coefficients in u = x^2


def float32_error(p, q):
    xs = numpy.linspace(-12, 12, 2000001).astype(numpy.float32)
    xc = numpy.clip(xs, -C, C).astype(numpy.float32)
    u = xc * xc
    P = numpy.zeros_like(u)
    Q = numpy.zeros_like(u)
    for c in p[::-1].astype(numpy.float32):
        P = P * u + c
    for c in q[::-1].astype(numpy.float32):
        Q = Q * u + c
    return float(numpy.max(numpy.abs(xc * P / Q - numpy.tanh(xs.astype(numpy.float64)))))


if __name__ == "__main__":
    err, p, q = fit()
    print(f"max relative error of the fit: {err:.2e}; max abs error in float32: {float32_error(p, q):.2e}")
    print("P:", ", ".join(repr(float(c)) for c in p))
    print("Q:", ", ".join(repr(float(c)) for c in q))
