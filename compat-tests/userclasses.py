"""User-defined classes whose instances are passed as job arguments.

ppft's client ships the source of an argument's class hierarchy with the job,
and pickles the instance by reference (``userclasses.Polynomial``), so the
worker must also be able to import this module: the suite runs the server
with compat-tests/ on PYTHONPATH, which the server passes on to its workers.
"""


class Polynomial(object):
    """A polynomial with integer coefficients, lowest degree first."""

    def __init__(self, coeffs):
        self.coeffs = list(coeffs)

    def evaluate(self, x):
        total = 0
        for c in reversed(self.coeffs):
            total = total * x + c
        return total


class ScaledPolynomial(Polynomial):
    """A subclass, so the class hierarchy (not just one class) must travel."""

    def __init__(self, coeffs, scale):
        Polynomial.__init__(self, coeffs)
        self.scale = scale

    def evaluate(self, x):
        return self.scale * Polynomial.evaluate(self, x)
