"""The study file (``configs/studies/*.yaml``) as typed, validated values, and the plan of runs
it describes: methods × learning rates × seeds, each one ``slope-lightning fit`` command.

Every run of a study shares the base fit config, the ``common`` arguments (steps, batch,
validation) and so the number of tokens; a method adds the arguments that select it (e.g.
``--model.sparsity.sparse=false``); the runner adds the seed, the learning rate and where the
run logs. The data split and tokenizer come from the base config's ``data.seed`` and are the
same for every run; ``seed_everything`` sets each run's initialisation and, through
``data.order_seed``'s default, its data order, so runs with the same seed see the same
batches (paired comparisons).

The plan has three stages, so that a fair study stays affordable and its learning rate is not
chosen on one seed:

* the **sweep**: every method with its own ``lrs`` grid runs each lr with the
  ``sweep_seeds`` (by default the first seed);
* the **refine**: each swept method's best lr of the sweep (the lowest mean validation loss
  over the sweep seeds) and its better neighbour on the grid (the adjacent lr of lower sweep
  loss; none when the grid has one lr, or when every neighbour diverged) run on every seed of
  the method; a refine run that is a sweep run (same method, lr and seed) is that run;
* the **choice**: the method's lr is the refine lr of the lowest mean validation loss over
  every seed; a method with ``lr_from: <other>`` (an ablation, a variant, a post-training
  baseline) then runs each of its seeds at the other's chosen lr.

The runs of the later stages are planned once the earlier ones have finished, so
:meth:`StudyConfig.plan` takes what the finished runs have decided so far (:class:`LrChoice`,
made by :func:`~slope_lightning.study.selection.choose`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

#: Version of the study file schema and of each run's ``result.json`` marker.
FORMAT = "slope-lightning-study/1"
#: The marker a finished run writes last, in its run folder.
MARKER = "result.json"


class StudyConfigError(ValueError):
    """A study file that cannot work; the message names the key and the fix."""


@dataclass(frozen=True)
class MethodSpec:
    """One training method of a study.

    Attributes:
        name: short id, used in run folders and metric keys (letters, digits, ``-``, ``_``).
        lrs: its learning-rate grid (each method gets its own: one lr is not one step size
            for a dense and a 2:4 layer under Adam); empty when ``lr_from`` is set.
        args: ``fit`` arguments that select the method, e.g. ``--model.sparsity.sparse=false``.
        config: its own base fit config (None: the study's ``base_config``).
        label: what the report calls it (None: ``name``).
        lr_from: run at the chosen learning rate of this other (swept) method instead of a
            grid.
        callbacks: the method's own callbacks (``class_path``/``init_args`` mappings), added to
            the study's ``callbacks``; None with no study ``callbacks`` keeps the base config's.
        seeds: the seeds this method runs (None: every seed of the study).
        group: ``"method"`` (the main table) or ``"ablation"`` (the ablation table).
        compare_to: the method its paired ratio is taken against (None: the study baseline).
    """

    name: str
    lrs: tuple[float, ...] = ()
    args: tuple[str, ...] = ()
    config: str | None = None
    label: str | None = None
    lr_from: str | None = None
    callbacks: tuple[dict[str, Any], ...] | None = None
    seeds: tuple[int, ...] | None = None
    group: str = "method"
    compare_to: str | None = None

    @property
    def title(self) -> str:
        return self.label or self.name

    @property
    def swept(self) -> bool:
        """Whether the method has its own learning-rate grid (else it follows ``lr_from``)."""
        return self.lr_from is None


@dataclass(frozen=True)
class StudyConfig:
    """A study: methods × learning rates × seeds at equal tokens, and where its results go.

    Attributes:
        name: the report's file stem (``<report_dir>/<name>.md``, ``.json``, ``-*.png``).
        base_config: the fit config every run starts from (relative to the working directory,
            like ``--config``).
        methods: the methods, each with its lr grid.
        seeds: ``seed_everything`` of each run (its initialisation and data order): every
            swept method runs each seed at its refine learning rates, every other method at
            its chosen one.
        sweep_seeds: the seeds of the learning-rate sweep (a subset of ``seeds``; default the
            first).
        callbacks: callbacks of every run (``class_path``/``init_args`` mappings), passed as
            ``--trainer.callbacks``, with each method's own appended (None: the base
            config's callbacks, unchanged).
        common: ``fit`` arguments of every run (steps, batch, validation, model size).
        runs_dir: each run's folder is ``<runs_dir>/<method>/lr<lr>/seed<seed>``: TensorBoard
            logs, checkpoints, export, the fit's output (``fit.log``) and ``result.json``.
        report_dir: where the report is written.
        records_dir: where each finished run's ``result.json`` is also kept, as
            ``<records_dir>/<method>/lr<lr>/seed<seed>.json`` (None: only in its run folder).
            Commit it: a run with a record is finished on any machine, so a study continues
            in another session or on another machine without re-running a finished run.
        baseline: the method the report's ratios are relative to (None: the first method).
        eval_windows: windows of each split's stratified order (validation, test) evaluated
            on each finished run's export (None: every window of the split).
        eval_batch_size: windows per evaluation batch.
        description: one paragraph for the report saying what the study is.
    """

    name: str
    base_config: str
    methods: tuple[MethodSpec, ...]
    seeds: tuple[int, ...]
    sweep_seeds: tuple[int, ...] = ()
    callbacks: tuple[dict[str, Any], ...] | None = None
    common: tuple[str, ...] = ()
    runs_dir: str = "runs/study"
    report_dir: str = "benchmarks/results/quality"
    records_dir: str | None = None
    baseline: str | None = None
    eval_windows: int | None = None
    eval_batch_size: int = 8
    description: str = ""
    source: Path | None = field(default=None, compare=False)

    @property
    def baseline_method(self) -> MethodSpec:
        """The method the ratios are relative to."""
        return self.method(self.baseline or self.methods[0].name)

    def method(self, name: str) -> MethodSpec:
        """The method called ``name``."""
        return next(method for method in self.methods if method.name == name)

    def seeds_of(self, method: MethodSpec) -> tuple[int, ...]:
        """The seeds ``method`` runs (its own, else the study's)."""
        return method.seeds if method.seeds is not None else self.seeds

    @classmethod
    def from_file(cls, path: str | Path) -> StudyConfig:
        """Read and validate a study file.

        A file with ``extends: <other study file>`` (a path relative to this file) takes
        every key of the other one and replaces those it gives; under ``methods`` it updates
        each named method's settings (e.g. only its ``lrs``) and adds new methods.

        Raises:
            StudyConfigError: the file is missing, is not a YAML mapping, or a key is
                unknown, missing or of a wrong value (the message names it).
        """
        path = Path(path)
        if not path.is_file():
            raise StudyConfigError(f"study file {str(path)!r} does not exist")
        data = _read_mapping(path)
        return cls.from_dict(_extended(path, data, seen=(path.resolve(),)), source=path)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: Path | None = None) -> StudyConfig:
        """Build a study from plain values (a parsed study file); see :meth:`from_file`.

        Raises:
            StudyConfigError: as :meth:`from_file`.
        """
        where = f"{source}: " if source is not None else ""
        known = {f.name for f in fields(cls)} - {"source"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise StudyConfigError(
                f"{where}unknown key(s) {unknown}; a study file has {sorted(known)}"
            )
        for key in ("name", "base_config", "methods", "seeds"):
            if key not in data:
                raise StudyConfigError(f"{where}missing key {key!r}")
        name = _name(data["name"], f"{where}name")
        methods_data = data["methods"]
        if not isinstance(methods_data, Mapping) or not methods_data:
            raise StudyConfigError(
                f"{where}methods must map each method's name to its settings "
                "({lrs: [...], args: [...]}), got {methods_data!r}"
            )
        callbacks = data.get("callbacks")
        common_callbacks = (
            _callbacks(callbacks, f"{where}callbacks") if callbacks is not None else None
        )
        methods = tuple(
            _method(method_name, spec, f"{where}methods.{method_name}", common_callbacks)
            for method_name, spec in methods_data.items()
        )
        seeds = _seeds(data["seeds"], f"{where}seeds")
        sweep_seeds = _seeds(data.get("sweep_seeds", list(seeds[:1])), f"{where}sweep_seeds")
        if not set(sweep_seeds) <= set(seeds):
            raise StudyConfigError(
                f"{where}sweep_seeds {list(sweep_seeds)} must be a subset of seeds {list(seeds)}"
            )
        _check_method_links(methods, seeds, sweep_seeds, where)
        baseline = data.get("baseline")
        if baseline is not None and baseline not in {m.name for m in methods}:
            raise StudyConfigError(
                f"{where}baseline {baseline!r} is not one of the methods "
                f"{[m.name for m in methods]}"
            )
        eval_windows = data.get("eval_windows")
        if eval_windows is not None and (
            isinstance(eval_windows, bool) or not isinstance(eval_windows, int) or eval_windows < 1
        ):
            raise StudyConfigError(
                f"{where}eval_windows must be a positive integer (or null for every window "
                f"of each split), got {eval_windows!r}"
            )
        batch = data.get("eval_batch_size", 8)
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise StudyConfigError(
                f"{where}eval_batch_size must be a positive integer, got {batch!r}"
            )
        return cls(
            name=name,
            base_config=_text(data["base_config"], f"{where}base_config"),
            methods=methods,
            seeds=seeds,
            sweep_seeds=sweep_seeds,
            callbacks=common_callbacks,
            common=_arguments(data.get("common", []), f"{where}common"),
            runs_dir=_text(data.get("runs_dir", "runs/study"), f"{where}runs_dir"),
            report_dir=_text(
                data.get("report_dir", "benchmarks/results/quality"), f"{where}report_dir"
            ),
            records_dir=(
                _text(data["records_dir"], f"{where}records_dir")
                if data.get("records_dir") is not None
                else None
            ),
            baseline=baseline,
            eval_windows=eval_windows,
            eval_batch_size=batch,
            description=_text(data.get("description", ""), f"{where}description", empty=True),
            source=source,
        )

    def plan(self, choices: Mapping[str, LrChoice] | None = None) -> list[RunSpec]:
        """The runs of the study that can be planned, given what the finished runs have
        decided (``swept method -> LrChoice``; missing: its sweep is unfinished).

        Seed by seed (the first seed's runs give a whole one-seed comparison before the
        second seed starts); within a seed, the swept methods first (their grid on a sweep
        seed, else their refine lrs), then the ``lr_from`` methods at their source's chosen
        lr. A run whose learning rate is not known yet is left out (see :meth:`planned_count`).
        """
        choices = choices or {}
        runs: list[RunSpec] = []
        for seed in self.seeds:
            for method in sorted(self.methods, key=lambda m: not m.swept):
                if seed not in self.seeds_of(method):
                    continue
                if method.swept and seed in self.sweep_seeds:
                    lrs: Sequence[float] = method.lrs
                elif method.swept:
                    lrs = choices.get(method.name, LrChoice()).refine
                else:
                    chosen = choices.get(str(method.lr_from), LrChoice()).chosen
                    lrs = [chosen] if chosen is not None else []
                runs.extend(RunSpec.of(self, method, lr, seed) for lr in lrs)
        return runs

    def planned_count(self, choices: Mapping[str, LrChoice] | None = None) -> int:
        """How many runs the whole study has: every stage, with the refine lrs that
        ``choices`` gives, else two per swept method (one when its grid has one lr)."""
        choices = choices or {}
        count = 0
        for method in self.methods:
            seeds = self.seeds_of(method)
            if method.swept:
                sweep = [s for s in seeds if s in self.sweep_seeds]
                known = choices.get(method.name, LrChoice()).refine
                refine = len(known) if known else min(2, len(method.lrs))
                count += len(sweep) * len(method.lrs) + (len(seeds) - len(sweep)) * refine
            else:
                count += len(seeds)
        return count


@dataclass(frozen=True)
class LrChoice:
    """What a swept method's finished runs have decided about its learning rate.

    Attributes:
        refine: the lrs that run on every seed: the sweep's best and its better neighbour on
            the grid, ascending (empty until the sweep has finished, or if every lr diverged).
        chosen: the method's lr: the refine lr of the lowest mean validation loss over every
            seed (None until every refine run has finished, or if each diverged on a seed).
    """

    refine: tuple[float, ...] = ()
    chosen: float | None = None


@dataclass(frozen=True)
class RunSpec:
    """One run of a study: a method at one learning rate and one seed, and its fit command.

    Attributes:
        method: the method's name.
        lr: peak learning rate (``model.optimizer.lr``).
        seed: ``seed_everything``.
        root: the run's folder (its TensorBoard logger's ``save_dir/name``).
        args: the ``slope-lightning`` arguments of the run, ``fit`` first.
        record: the copy of its marker under the study's ``records_dir`` (None: none kept).
    """

    method: str
    lr: float
    seed: int
    root: Path
    args: tuple[str, ...]
    record: Path | None = None

    @property
    def run_id(self) -> str:
        """``<method>/lr<lr>/seed<seed>``: the run's folder below the study's ``runs_dir``."""
        return f"{self.method}/lr{format_lr(self.lr)}/seed{self.seed}"

    @property
    def marker(self) -> Path:
        """The file a finished run writes last."""
        return self.root / MARKER

    @classmethod
    def of(cls, study: StudyConfig, method: MethodSpec, lr: float, seed: int) -> RunSpec:
        run_id = f"{method.name}/lr{format_lr(lr)}/seed{seed}"
        logger = {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": study.runs_dir, "name": run_id},
        }
        callbacks: tuple[str, ...] = ()
        if method.callbacks is not None:
            listed = [*(study.callbacks or ()), *method.callbacks]
            callbacks = (f"--trainer.callbacks={json.dumps(listed)}",)
        args = (
            "fit",
            "--config",
            method.config or study.base_config,
            *study.common,
            *method.args,
            *callbacks,
            f"--seed_everything={seed}",
            f"--model.optimizer.lr={lr!r}",
            f"--trainer.logger={json.dumps(logger)}",
            "--trainer.enable_progress_bar=false",
        )
        record = Path(study.records_dir) / f"{run_id}.json" if study.records_dir else None
        return cls(method.name, lr, seed, Path(study.runs_dir) / run_id, args, record)


def format_lr(lr: float) -> str:
    """A learning rate as it appears in run names: ``0.003``, ``1e-05``."""
    return f"{lr:g}"


def _read_mapping(path: Path) -> Mapping[str, Any]:
    """The YAML mapping of study keys in the file at ``path``.

    Raises:
        StudyConfigError: the file is not valid YAML or does not hold a mapping.
    """
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise StudyConfigError(f"{path} is not valid YAML: {error}") from error
    if not isinstance(data, Mapping):
        raise StudyConfigError(f"{path} must hold a mapping of study keys")
    return data


def _extended(path: Path, data: Mapping[str, Any], seen: tuple[Path, ...]) -> dict[str, Any]:
    """``data`` with its ``extends`` chain resolved (see :meth:`StudyConfig.from_file`)."""
    data = dict(data)
    parent_name = data.pop("extends", None)
    if parent_name is None:
        return data
    if not isinstance(parent_name, str) or not parent_name:
        raise StudyConfigError(f"{path}: extends must name a study file, got {parent_name!r}")
    parent_path = (path.parent / parent_name).resolve()
    if parent_path in seen:
        raise StudyConfigError(f"{path}: extends {parent_name!r} makes a cycle")
    if not parent_path.is_file():
        raise StudyConfigError(
            f"{path}: extends {parent_name!r}, which does not exist ({parent_path}; the path is "
            "relative to the extending file)"
        )
    parent = _read_mapping(parent_path)
    merged = _extended(parent_path, parent, (*seen, parent_path))
    methods = dict(merged.get("methods") or {})
    changes = data.pop("methods", None) or {}
    if not isinstance(changes, Mapping):
        raise StudyConfigError(f"{path}: methods must be a mapping, got {changes!r}")
    for name, change in changes.items():
        base = methods.get(name)
        if isinstance(base, Mapping) and isinstance(change, Mapping):
            methods[name] = {**base, **change}
        else:
            methods[name] = change
    merged.update(data)
    merged["methods"] = methods
    return merged


# ---------------------------------------------------------------------------- validation


def _name(value: object, where: str) -> str:
    if not isinstance(value, str) or not value or not all(c.isalnum() or c in "-_" for c in value):
        raise StudyConfigError(
            f"{where} must be a non-empty name of letters, digits, '-' and '_', got {value!r}"
        )
    return value


def _text(value: object, where: str, empty: bool = False) -> str:
    if not isinstance(value, str) or (not value and not empty):
        raise StudyConfigError(
            f"{where} must be a {'' if empty else 'non-empty '}string, got {value!r}"
        )
    return value


def _arguments(value: object, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(
        isinstance(a, str) and a.startswith("--") for a in value
    ):
        raise StudyConfigError(
            f"{where} must be a list of fit arguments such as '--trainer.max_steps=300', "
            f"got {value!r}"
        )
    for argument in value:
        key = argument[2:].split("=", 1)[0]
        if key in _RUNNER_KEYS:
            raise StudyConfigError(
                f"{where}: {argument!r} sets {key}, which the study sets for each run; drop it"
            )
    return tuple(value)


#: fit arguments the runner sets itself; a study file may not.
_RUNNER_KEYS = frozenset(
    {
        "seed_everything",
        "model.optimizer.lr",
        "trainer.logger",
        "trainer.callbacks",
        "ckpt_path",
        "config",
    }
)


def _method(
    name: object,
    spec: object,
    where: str,
    common_callbacks: tuple[dict[str, Any], ...] | None,
) -> MethodSpec:
    name = _name(name, f"{where} (the method's name)")
    if not isinstance(spec, Mapping):
        raise StudyConfigError(f"{where} must be a mapping with lrs and args, got {spec!r}")
    keys = {"lrs", "args", "config", "label", "lr_from", "callbacks", "seeds", "group"}
    keys |= {"compare_to"}
    unknown = sorted(set(spec) - keys)
    if unknown:
        raise StudyConfigError(f"{where}: unknown key(s) {unknown}; use {sorted(keys)}")
    lrs = spec.get("lrs")
    lr_from = spec.get("lr_from")
    if lr_from is not None:
        lr_from = _name(lr_from, f"{where}.lr_from")
        if lrs is not None:
            raise StudyConfigError(
                f"{where}: give either lrs (its own sweep) or lr_from (another method's best "
                "lr), not both"
            )
        lrs = []
    elif (
        not isinstance(lrs, list)
        or not lrs
        or not all(
            isinstance(lr, int | float)
            and not isinstance(lr, bool)
            and math.isfinite(lr)
            and lr > 0
            for lr in lrs
        )
        or len(set(lrs)) != len(lrs)
    ):
        raise StudyConfigError(
            f"{where}.lrs must be a non-empty list of distinct positive learning rates (or "
            f"give lr_from: <method>), got {lrs!r}"
        )
    config = spec.get("config")
    label = spec.get("label")
    callbacks = spec.get("callbacks")
    own_callbacks = _callbacks(callbacks, f"{where}.callbacks") if callbacks is not None else None
    if own_callbacks is None and common_callbacks is not None:
        own_callbacks = ()  # the study's callbacks replace the base config's for every run
    group = spec.get("group", "method")
    if group not in ("method", "ablation"):
        raise StudyConfigError(f"{where}.group must be 'method' or 'ablation', got {group!r}")
    seeds = spec.get("seeds")
    compare_to = spec.get("compare_to")
    return MethodSpec(
        name=name,
        lrs=tuple(sorted(float(lr) for lr in lrs)),
        args=_arguments(spec.get("args", []), f"{where}.args"),
        config=_text(config, f"{where}.config") if config is not None else None,
        label=_text(label, f"{where}.label") if label is not None else None,
        lr_from=lr_from,
        callbacks=own_callbacks,
        seeds=_seeds(seeds, f"{where}.seeds") if seeds is not None else None,
        group=group,
        compare_to=_name(compare_to, f"{where}.compare_to") if compare_to is not None else None,
    )


def _seeds(value: object, where: str) -> tuple[int, ...]:
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value)
        or len(set(value)) != len(value)
    ):
        raise StudyConfigError(
            f"{where} must be a non-empty list of distinct integers >= 0, got {value!r}"
        )
    return tuple(value)


def _callbacks(value: object, where: str) -> tuple[dict[str, Any], ...]:
    if not isinstance(value, list) or not all(
        isinstance(c, Mapping)
        and isinstance(c.get("class_path"), str)
        and set(c) <= {"class_path", "init_args"}
        and isinstance(c.get("init_args", {}), Mapping)
        for c in value
    ):
        raise StudyConfigError(
            f"{where} must be a list of callbacks, each a mapping with class_path and "
            f"optionally init_args (as in a fit config's trainer.callbacks), got {value!r}"
        )
    return tuple(dict(c) for c in value)


def _check_method_links(
    methods: tuple[MethodSpec, ...],
    seeds: tuple[int, ...],
    sweep_seeds: tuple[int, ...],
    where: str,
) -> None:
    """Every ``lr_from`` names a swept method, every ``compare_to`` a method, every
    method's seeds are study seeds, and a swept method runs every sweep seed."""
    by_name = {method.name: method for method in methods}
    for method in methods:
        if method.lr_from is not None:
            source = by_name.get(method.lr_from)
            if source is None or not source.swept:
                swept = [m.name for m in methods if m.swept]
                raise StudyConfigError(
                    f"{where}methods.{method.name}.lr_from: {method.lr_from!r} is not a method "
                    f"with its own lrs; choose one of {swept}"
                )
        if method.compare_to is not None and method.compare_to not in by_name:
            raise StudyConfigError(
                f"{where}methods.{method.name}.compare_to: {method.compare_to!r} is not one of "
                f"the methods {sorted(by_name)}"
            )
        if method.seeds is not None:
            if not set(method.seeds) <= set(seeds):
                raise StudyConfigError(
                    f"{where}methods.{method.name}.seeds {list(method.seeds)} must be a subset "
                    f"of the study's seeds {list(seeds)}"
                )
            if method.swept and not set(sweep_seeds) <= set(method.seeds):
                raise StudyConfigError(
                    f"{where}methods.{method.name}.seeds must include the sweep seeds "
                    f"{list(sweep_seeds)}: its learning rate is chosen from them"
                )
