"""The search space in Hydra's override syntax, as Optuna distributions.

`choice(a, b)` is categorical, `range(1, 9, 2)` the values Hydra's range gives (its end left
out, as Python's), `interval(0.1, 0.5)` uniform, `tag(log, interval(...))` log-uniform; a plain
value is fixed for every trial. The same syntax as hydra-optuna-sweeper's, so that the presets
in conf/hparams_search/ and command lines keep working.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, Override, RangeSweep, Transformer
from hydra.errors import HydraException

from pipeline.errors import SearchError


@dataclass(frozen=True)
class SearchSpace:
    """{override key: Optuna distribution} to sample, and the fixed overrides of every trial."""

    distributions: dict[str, Any]
    fixed: tuple[str, ...]

    @classmethod
    def parse(cls, params: Mapping[str, str], arguments: Iterable[str]) -> SearchSpace:
        """`params` (hydra.sweeper.params), then the command line's overrides: a key given on
        both is the command line's."""
        texts = {key: f"{key}={value}" for key, value in params.items()}
        for argument in arguments:
            texts[argument.split("=", 1)[0]] = argument
        try:
            overrides = OverridesParser.create().parse_overrides(list(texts.values()))
        except HydraException as err:
            raise SearchError(f"hydra.sweeper.params: {err}") from err
        distributions, fixed = {}, []
        for override in overrides:
            if override.is_sweep_override():
                distributions[override.get_key_element()] = distribution(override)
            else:
                fixed.append(override.input_line or "")
        return cls(distributions, tuple(fixed))

    def grid(self) -> dict[str, list[Any]]:
        """The values of every parameter, for Optuna's GridSampler (choices and ranges only)."""
        from optuna.distributions import CategoricalDistribution, IntDistribution

        grid = {}
        for key, dist in self.distributions.items():
            if isinstance(dist, CategoricalDistribution):
                grid[key] = list(dist.choices)
            elif isinstance(dist, IntDistribution) and not dist.log:
                grid[key] = list(range(dist.low, dist.high + 1, dist.step))
            else:
                raise SearchError(
                    f"hydra/sweeper/sampler=grid: {key} is {dist}; a grid takes choice(...) "
                    "and integer range(...) parameters"
                )
        return grid

    def overrides(self, params: Mapping[str, Any]) -> list[str]:
        """A trial's command line: the fixed overrides, then its sampled values."""
        return [*self.fixed, *(f"{key}={value}" for key, value in params.items())]

    def alternatives(self) -> list[list[str]]:
        """Each key's overrides to check before any trial starts: a fixed value, every choice,
        a range's or an interval's two ends (the values a trial may be given, at their edges)."""
        from optuna.distributions import CategoricalDistribution

        checked = [[override] for override in self.fixed]
        for key, dist in self.distributions.items():
            if isinstance(dist, CategoricalDistribution):
                values = dist.choices
            else:  # a range or an interval
                values = (dist.low, dist.high)
            checked.append([f"{key}={value}" for value in values])
        return checked


def distribution(override: Override) -> Any:
    """The Optuna distribution of one sweep override."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    key, sweep = override.get_key_element(), override.value()
    log = "log" in getattr(sweep, "tags", ())
    if isinstance(sweep, IntervalSweep):
        start, end = sweep.start, sweep.end
        if start is None or end is None or not start < end or (log and start <= 0):
            raise SearchError(
                f"{key}: interval({start}, {end}) is not an interval; allowed: "
                "interval(low, high) with low < high (and low > 0 under tag(log, ...))"
            )
        if isinstance(start, int) and isinstance(end, int):
            return IntDistribution(start, end, log=log)
        return FloatDistribution(float(start), float(end), log=log)
    values = list(override.sweep_iterator(transformer=Transformer.encode))
    if log:
        raise SearchError(f"{key}: tag(log, ...) takes an interval(low, high), not {values}")
    if not values:
        raise SearchError(f"{key}: {override.input_line} has no values")
    integers = all(isinstance(v, int) for v in values)
    if isinstance(sweep, RangeSweep) and not sweep.shuffle and integers and sweep.step > 0:
        return IntDistribution(values[0], values[-1], step=int(sweep.step))
    return CategoricalDistribution(values)
