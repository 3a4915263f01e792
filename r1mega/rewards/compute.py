"""Combine weighted reward terms per sample, routed by ``data_source``, in a worker pool.

``RewardComputer`` resolves ``reward.terms`` against the registry (rule rewards) and ``reward.models``
(reward models and judges, ``rewards.model_rewards``) once, then scores batches: each sample gets the
terms that apply to its data source (the term's ``data_sources`` if set, else the reward's registered
default; ``general`` for model rewards), total = sum(weight * value). Rule terms run per sample (in the
pool); model terms run batched in this process over the samples routed to them. A term that raises
scores 0 and its error is kept in the result; a batch that outlives ``batch_timeout_s`` or kills a
worker scores 0 for the unfinished samples and the pool is rebuilt. Rewards can therefore slow a step, never crash it.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, replace
from typing import Any, Mapping, Optional

from r1mega.config.errors import ConfigError
from r1mega.config.schema import RewardConfig, RewardTermConfig
from r1mega.config.validate import check_sandbox
from r1mega.rewards.formatting import ANSWER_FORMATS, FORMAT_MODES
from r1mega.rewards.language import LANGUAGE_SCRIPTS
from r1mega.rewards.model_rewards import DEFAULT_MODEL_SOURCES, ModelRewards, ModelTerm, check_model_rewards
from r1mega.rewards.registry import RewardFn, get_reward, registered_rewards
from r1mega.rewards.sample import RewardInput, RewardResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Term:
    name: str
    weight: float
    fn: RewardFn
    data_sources: Optional[frozenset[str]]  # None: every source

    def applies_to(self, data_source: str) -> bool:
        return self.data_sources is None or data_source in self.data_sources


_warned: set[tuple[str, str]] = set()


def score_sample(sample: RewardInput, terms: Sequence[Term], cfg: RewardConfig) -> RewardResult:
    """Score one sample in this process; each term is isolated from the others' failures."""
    result = RewardResult(0.0, data_source=sample.data_source)
    for term in terms:
        if not term.applies_to(sample.data_source):
            continue
        try:
            value = float(term.fn(sample, cfg))
        except Exception as exc:  # one bad sample or term must not kill the batch
            value = 0.0
            result.errors[term.name] = f"{type(exc).__name__}: {exc}"
            if (term.name, type(exc).__name__) not in _warned:
                _warned.add((term.name, type(exc).__name__))
                log.warning("reward term %r failed (scored 0; further such failures are not logged): %s",
                            term.name, result.errors[term.name])
        result.terms[term.name] = value
        result.total += term.weight * value
    return result


def _score_chunk(samples: list[RewardInput], terms: Sequence[Term], cfg: RewardConfig) -> list[RewardResult]:
    return [score_sample(s, terms, cfg) for s in samples]


def _warm_up(names: tuple[str, ...]) -> None:
    """Import math-verify/sympy (~1 s) when a term needs it, once per worker, before the first batch.

    Workers ignore SIGTERM/SIGUSR1/SIGINT: a signal to the whole process group (Slurm) lets the
    trainer finish its step and checkpoint; the pool is shut down by the trainer. A worker dies with the
    trainer (``r1mega.platform.lifetime``): watched, since its parent is the forkserver, which lives as
    long as any worker holds its pipe.
    """
    import signal

    from r1mega.platform.lifetime import die_with_parent

    die_with_parent(watch=True)

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    if "accuracy" in names:
        from r1mega.rewards.accuracy import _mv

        _mv()


def _resolve(term: RewardTermConfig) -> Term:
    spec = get_reward(term.name)
    sources = term.data_sources or spec.data_sources
    return Term(term.name, float(term.weight), spec.fn, frozenset(sources) if sources is not None else None)


def _resolve_model_term(term: RewardTermConfig, cfg: RewardConfig) -> ModelTerm:
    model = next(m for m in cfg.models if m.name == term.name)
    sources = term.data_sources or DEFAULT_MODEL_SOURCES
    return ModelTerm(term.name, float(term.weight), frozenset(sources), model)


def check_reward_config(cfg: RewardConfig) -> None:
    """Raise ``ConfigError`` listing every unknown term or bad setting of the reward section."""
    problems = []
    known = registered_rewards()
    models = [m.name for m in cfg.models]
    for i, term in enumerate(cfg.terms):
        if term.name not in known and term.name not in models:
            problems.append(f"reward.terms[{i}].name={term.name!r} is not a registered reward or a reward.models "
                            f"name: use one of {known + models}, or define it under reward.models")
    problems += check_model_rewards(cfg.models, known)
    if cfg.format_mode not in FORMAT_MODES:
        problems.append(f"reward.format_mode={cfg.format_mode!r}: use one of {FORMAT_MODES}")
    if cfg.answer_format not in ANSWER_FORMATS:
        problems.append(f"reward.answer_format={cfg.answer_format!r}: use one of {ANSWER_FORMATS}")
    if cfg.target_language not in LANGUAGE_SCRIPTS:
        problems.append(f"reward.target_language={cfg.target_language!r}: use one of {sorted(LANGUAGE_SCRIPTS)}")
    if cfg.overlong_buffer < 0 or (cfg.overlong_max_length is not None
                                   and cfg.overlong_buffer > cfg.overlong_max_length):
        problems.append(f"reward.overlong_buffer={cfg.overlong_buffer} must be in [0, overlong_max_length]")
    problems += check_sandbox(cfg.sandbox)
    if problems:
        raise ConfigError(problems)


class RewardComputer:
    """Scores batches of samples with the configured terms (a process pool when ``num_workers > 0``).

    Use as a context manager, or call ``close()``, to stop the workers.
    """

    def __init__(self, cfg: RewardConfig, max_response_length: Optional[int] = None,
                 engines: Optional[Mapping[str, Any]] = None):
        """``engines``: the rollout engine of each judge, by model-reward name; they belong to the caller
        (``r1mega.rollout.judges`` starts them), ``close()`` leaves them running."""
        check_reward_config(cfg)
        if cfg.overlong_max_length is None and max_response_length is not None:
            cfg = replace(cfg, overlong_max_length=max_response_length)
        self.cfg = cfg
        model_names = {m.name for m in cfg.models}
        self.terms = tuple(_resolve(t) for t in cfg.terms if t.name not in model_names)
        self.models = ModelRewards([_resolve_model_term(t, cfg) for t in cfg.terms if t.name in model_names],
                                   engines)
        if any(t.name == "code" for t in self.terms):
            from r1mega.rewards.sandbox import checked_isolation

            checked_isolation(cfg.sandbox)  # probe and log once, here in the parent; refuse a required layer
        self._pool: Optional[ProcessPoolExecutor] = None

    # ----------------------------------------------------------------------------- routing

    def terms_for(self, data_source: str) -> list[str]:
        return [t.name for t in (*self.terms, *self.models.terms) if t.applies_to(data_source)]

    # ----------------------------------------------------------------------------- scoring

    def score(self, sample: RewardInput) -> RewardResult:
        return self.compute([sample])[0]

    def compute(self, samples: Sequence[RewardInput]) -> list[RewardResult]:
        """One result per sample, in order."""
        samples = list(samples)
        results = self._compute_rules(samples)
        self.models.add_to(samples, results)
        return results

    def _compute_rules(self, samples: list[RewardInput]) -> list[RewardResult]:
        if self.cfg.num_workers <= 0 or len(samples) <= 1:
            return [score_sample(s, self.terms, self.cfg) for s in samples]
        pool = self._get_pool()
        n_chunks = min(len(samples), self.cfg.num_workers * 4)
        bounds = [round(i * len(samples) / n_chunks) for i in range(n_chunks + 1)]
        futures: list[Future] = [pool.submit(_score_chunk, samples[a:b], self.terms, self.cfg)
                                 for a, b in zip(bounds, bounds[1:])]
        done, pending = wait(futures, timeout=self.cfg.batch_timeout_s)  # a dead worker fails them all fast
        results: list[RewardResult] = []
        broken = bool(pending)
        for (a, b), fut in zip(zip(bounds, bounds[1:]), futures):
            chunk = samples[a:b]
            if fut in done and fut.exception() is None:
                results += fut.result()
                continue
            why = "timeout" if fut not in done else f"worker failed: {fut.exception()!r}"
            broken = True
            results += [self._failed(s, why) for s in chunk]
        if broken:
            log.warning("reward batch: %d/%d samples not scored (%s); restarting the reward workers",
                        sum(1 for r in results if r.errors.get("_batch")), len(samples),
                        "timeout" if pending else "a worker died")
            self._kill_pool()
        return results

    def _failed(self, sample: RewardInput, why: str) -> RewardResult:
        names = self.terms_for(sample.data_source)
        return RewardResult(0.0, {n: 0.0 for n in names}, {"_batch": why}, sample.data_source)

    # ----------------------------------------------------------------------------- pool

    def _get_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # forkserver: workers start from a clean process, not a fork of a trainer holding threads
            # (the caller's main module must be import-safe: `if __name__ == "__main__":`)
            ctx = multiprocessing.get_context("forkserver")
            self._pool = ProcessPoolExecutor(self.cfg.num_workers, mp_context=ctx, initializer=_warm_up,
                                             initargs=(tuple(t.name for t in self.terms),))
        return self._pool

    def _kill_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            proc.kill()
        pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        self.models.close()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> RewardComputer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def summarize(results: Sequence[RewardResult]) -> dict[str, float]:
    """Metrics: mean total, mean of each term over the samples it scored, per-source totals, errors."""
    if not results:
        return {}
    out = {"reward/total": sum(r.total for r in results) / len(results)}
    by_term: dict[str, list[float]] = defaultdict(list)
    by_source: dict[str, list[float]] = defaultdict(list)
    for r in results:
        by_source[r.data_source].append(r.total)
        for name, value in r.terms.items():
            by_term[name].append(value)
    out.update({f"reward/{k}": sum(v) / len(v) for k, v in sorted(by_term.items())})
    if len(by_source) > 1:
        out.update({f"reward/source/{k}": sum(v) / len(v) for k, v in sorted(by_source.items())})
    out["reward/errors"] = float(sum(bool(r.errors) for r in results))
    return out
